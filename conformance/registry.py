"""The technique registry: every `twinops.conformance.spec.Spec`, by name.

Specs live in `twinops.conformance.specs`: one module per family, or a subpackage per family with
one module per technique. Every module there (names starting with ``_`` excepted) is imported on
first use, and importing a spec module registers its specs. Reading the registry imports neither torch nor triton.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
from pathlib import Path

from .spec import Spec


_SPECS: dict[str, Spec] = {}
_loaded = False


def register(*specs: Spec) -> None:
    for spec in specs:
        if spec.name in _SPECS:
            raise ValueError(f"technique {spec.name!r} is registered twice")
        _SPECS[spec.name] = spec


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in spec_modules():
            importlib.import_module(module)


def spec_modules() -> list[str]:
    """Every spec module under ``twinops.conformance.specs``, in name order."""
    import pkgutil

    from . import specs

    found = [m.name for m in pkgutil.walk_packages(specs.__path__, specs.__name__ + ".")
             if not m.name.rpartition(".")[2].startswith("_")]
    return sorted(found)


def all_specs() -> list[Spec]:
    """Every registered spec, ordered by paper number then name."""
    _load()
    return sorted(_SPECS.values(), key=lambda s: (s.paper, s.name))


def names() -> list[str]:
    return [s.name for s in all_specs()]


def get(name: str) -> Spec:
    """The spec called ``name``; ``KeyError`` lists the known names otherwise."""
    _load()
    try:
        return _SPECS[name]
    except KeyError:
        raise KeyError(f"unknown technique {name!r}; known: {', '.join(sorted(_SPECS))}") from None


DOCS_DIR = Path(__file__).resolve().parent.parent / "docs"


def module_source(module: str) -> Path | None:
    """The source file of ``module`` (dotted name), found without importing it or its packages
    below the top level (so without torch for ``twinops.accelerated.*``); None if there is none."""
    top, _, rest = module.partition(".")
    head, _, tail = rest.partition(".")
    try:
        found = importlib.util.find_spec(f"{top}.{head}" if head else top)
    except (ImportError, ValueError):
        return None
    if found is None:
        return None
    if not tail:
        return Path(found.origin) if found.origin else None
    for location in found.submodule_search_locations or ():
        base = Path(location).joinpath(*tail.split("."))
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def locate(path: str) -> tuple[str, str]:
    """Where the object at ``"package.module:attr"`` is defined, as ``(module, name)``.

    Follows ``from .x import attr`` re-exports in the source, so nothing is imported (no torch for
    ``twinops.accelerated``); returns the given module when the source says no more."""
    module, _, attr = path.partition(":")
    for _ in range(8):  # a short chain of re-exports at most
        source = module_source(module)
        if source is None or not attr:
            break
        step = None
        for node in ast.parse(source.read_text("utf-8")).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == attr:
                return module, attr
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if (alias.asname or alias.name) == attr and node.module:
                        base = module if source.name == "__init__.py" else module.rpartition(".")[0]
                        for _ in range(node.level - 1):
                            base = base.rpartition(".")[0]
                        step = (f"{base}.{node.module}" if node.level else node.module, alias.name)
        if step is None:
            break
        module, attr = step
    return module, attr


def status(spec: Spec) -> dict[str, bool]:
    """Which parts of a technique exist: reference (+gradient), accelerated forward/backward,
    spec, eager baseline, docs page (generated from the spec: present when the reference has a
    docstring) and benchmark entry."""
    from .spec import resolve

    ref = resolve(spec.reference)
    acc_path = spec.accelerated if isinstance(spec.accelerated, str) else None
    has_bwd = False
    if acc_path is not None:
        module = locate(acc_path)[0]
        try:
            mod = importlib.import_module(module)
            has_bwd = bool(getattr(mod, "HAS_TRITON_BACKWARD", False))
        except ImportError:  # no torch / triton here (a docs build): read the source instead
            source = module_source(module)
            has_bwd = source is not None and bool(
                re.search(r"^HAS_TRITON_BACKWARD\s*=\s*True\b", source.read_text("utf-8"), re.M)
            )
    needs_grad = bool(spec.grad_inputs)
    return {
        "reference": ref is not None and (not needs_grad or spec.reference_grad is not None),
        "accelerated_fwd": spec.accelerated is not None,
        "accelerated_bwd": has_bwd if needs_grad else spec.accelerated is not None,
        "spec": True,
        "baseline": spec.baseline is not None,
        "docs": bool((ref.__module__ and importlib.import_module(ref.__module__).__doc__)),
        "benchmark": bool(spec.bench_cases) and (spec.bytes_moved is not None or spec.flops is not None),
    }
