# twinops — the README's commands. Everything sets itself up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
DOCS_SITE := .build/docs-site
DOCS_PKG  := .build/docs-pkg
REPORTS   := reports

export TRITON_INTERPRET ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: test report bench docs venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml .ci/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c .ci/constraints.txt -e ".[docs]"
	touch $(STAMP)

## make test: reference self-checks, conformance through the Triton interpreter, CLI, benchmark smoke, docs.
test: $(STAMP)
	$(PY) -m pytest -q tests
	$(MAKE) docs

## make report: conformance of every technique (+ benchmarks on a GPU), one table, JSON + Markdown.
report: $(STAMP)
	$(VENV)/bin/twinops report --out $(REPORTS)

## make bench: benchmarks (GPU: full shapes, timed; CPU: seconds-long smoke mode).
bench: $(STAMP)
	$(VENV)/bin/twinops bench --out $(REPORTS)

## make docs: the site, built strictly against a regular (non-editable) install of the package.
docs: $(STAMP)
	rm -rf $(DOCS_PKG)
	$(PIP) install -q --no-deps --target $(DOCS_PKG) .
	NO_MKDOCS_2_WARNING=1 PYTHONPATH=$(CURDIR)/$(DOCS_PKG) $(VENV)/bin/mkdocs build --strict -q -d $(DOCS_SITE)

clean:
	rm -rf $(VENV) .build $(REPORTS) site
