"""The paper catalog: the 62 papers twinops draws from, and the techniques planned for each.

The catalog ships as package data (``twinops/conformance/data/papers.json``) so that the docs and
the CLI can show coverage without the design notes at hand. `papers` reads it;
`technique_status` says whether a technique is registered yet.

The JSON is generated from the paper list and the technique table::

    python -m twinops.conformance.catalog --shared PATH --out conformance/data/papers.json

where ``PATH`` is the folder holding ``papers.md`` (``## P<n>. <title>`` headings) and
``TECHNIQUES.md`` (one table row per paper: paper, techniques, family, priority, issue).
``--check`` compares instead of writing and exits 1 when the file is out of date.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

SCHEMA = "twinops-papers/1"


@dataclass(frozen=True)
class Technique:
    """One planned technique: its public name and where it sits in the plan."""

    name: str
    paper: int
    family: str  # package family: classification, metric, layers, ...
    family_note: str = ""  # e.g. "other losses" for "classification (other losses)"
    priority: str = ""  # A (widely useful, clear kernel win), B, C (marginal)
    issue: str = ""  # the issue label that plans it
    note: str = ""  # what the technique table adds in parentheses


@dataclass(frozen=True)
class Paper:
    number: int
    short_name: str
    title: str
    techniques: tuple[Technique, ...]

    @property
    def id(self) -> str:
        return f"P{self.number}"


@lru_cache(maxsize=1)
def papers() -> tuple[Paper, ...]:
    """Every paper, in numbering order (P1 … P62)."""
    text = resources.files("twinops.conformance").joinpath("data/papers.json").read_text("utf-8")
    data = json.loads(text)
    if data.get("schema") != SCHEMA:
        raise ValueError(f"papers.json: expected schema {SCHEMA!r}, got {data.get('schema')!r}")
    return tuple(
        Paper(
            number=p["number"],
            short_name=p["short_name"],
            title=p["title"],
            techniques=tuple(Technique(paper=p["number"], **t) for t in p["techniques"]),
        )
        for p in data["papers"]
    )


def paper(number: int) -> Paper:
    """The paper numbered ``number``; ``KeyError`` otherwise."""
    for p in papers():
        if p.number == number:
            return p
    raise KeyError(f"no paper P{number}; the catalog has P1 … P{len(papers())}")


def techniques() -> list[Technique]:
    """Every planned technique, in paper order."""
    return [t for p in papers() for t in p.techniques]


def technique_status(name: str) -> str:
    """``"implemented"`` when a spec is registered under ``name``, ``"planned"`` otherwise."""
    from .registry import names

    return "implemented" if name in names() else "planned"


# --------------------------------------------------------------------------- generator

_PAPER_HEADING = re.compile(r"^##\s+P(\d+)\.\s+(.+?)\s*$")
_TABLE_ROW = re.compile(r"^\|\s*P(\d+)\s+(.+?)\s*\|(.*)\|\s*$")
_NAME = re.compile(r"`([^`]+)`")


def _split_top_level(text: str, separators: str) -> list[str]:
    """Split ``text`` at any of ``separators`` outside parentheses and backticks."""
    parts, current, depth, in_code = [], [], 0, False
    for char in text:
        if char == "`":
            in_code = not in_code
        elif not in_code and char == "(":
            depth += 1
        elif not in_code and char == ")":
            depth -= 1
        if char in separators and depth == 0 and not in_code:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    parts.append("".join(current).strip())
    return [p for p in parts if p]


def _spread(values: list[str], groups: int, what: str, number: int) -> list[str]:
    """One value per technique group: a single value applies to all, else one each."""
    if len(values) == 1:
        return values * groups
    if len(values) == groups:
        return values
    raise ValueError(f"P{number}: {len(values)} {what} values for {groups} technique groups")


def parse_titles(papers_md: str) -> dict[int, str]:
    titles = {}
    for line in papers_md.splitlines():
        match = _PAPER_HEADING.match(line)
        if match:
            titles[int(match.group(1))] = match.group(2)
    return titles


def parse_techniques(techniques_md: str) -> dict[int, dict]:
    """Rows of the paper → techniques table, by paper number.

    A techniques cell lists groups separated by ``,`` or ``·``; a group is one or more backticked
    names (``a``/``b``) and an optional note in parentheses. The family, priority and issue cells
    hold one value for every group, or one per group separated by ``·``.
    """
    rows = {}
    for line in techniques_md.splitlines():
        match = _TABLE_ROW.match(line)
        if not match:
            continue
        number, short_name = int(match.group(1)), match.group(2).strip()
        cells = [c.strip() for c in match.group(3).split("|")]
        if len(cells) != 4:
            raise ValueError(f"P{number}: expected 4 cells after the paper, got {len(cells)}")
        tech_cell, family_cell, priority_cell, issue_cell = cells
        groups = _split_top_level(tech_cell, ",·")
        families = _spread([v.strip() for v in family_cell.split("·")], len(groups), "family", number)
        priorities = _spread([v.strip() for v in priority_cell.split("·")], len(groups), "priority", number)
        issues = _spread([v.strip() for v in issue_cell.split("·")], len(groups), "issue", number)
        entries = []
        for group, family_text, priority, issue in zip(groups, families, priorities, issues):
            names = _NAME.findall(group)
            if not names:
                raise ValueError(f"P{number}: no technique name in {group!r}")
            note = _NAME.sub("", group).replace("/", " ").strip()
            if note.startswith("(") and note.endswith(")"):
                note = note[1:-1].strip()
            family_match = re.match(r"^([\w-]+)\s*(?:\((.*)\))?$", family_text)
            if not family_match:
                raise ValueError(f"P{number}: cannot read family {family_text!r}")
            for name in names:
                entries.append(
                    {
                        "name": name.strip(),
                        "family": family_match.group(1),
                        "family_note": (family_match.group(2) or "").strip(),
                        "priority": priority,
                        "issue": issue,
                        "note": note,
                    }
                )
        rows[number] = {"short_name": short_name, "techniques": entries}
    return rows


def build(shared: Path) -> dict:
    """The catalog as a JSON-ready dict, from ``papers.md`` and ``TECHNIQUES.md`` in ``shared``."""
    titles = parse_titles((shared / "papers.md").read_text("utf-8"))
    rows = parse_techniques((shared / "TECHNIQUES.md").read_text("utf-8"))
    if set(titles) != set(rows):
        raise ValueError(
            f"papers.md and TECHNIQUES.md disagree on the papers: "
            f"only in papers.md {sorted(set(titles) - set(rows))}, "
            f"only in TECHNIQUES.md {sorted(set(rows) - set(titles))}"
        )
    numbers = sorted(titles)
    if numbers != list(range(1, len(numbers) + 1)):
        raise ValueError(f"paper numbers are not 1 … n: {numbers}")
    seen: dict[str, int] = {}
    for number in numbers:
        for entry in rows[number]["techniques"]:
            if entry["name"] in seen:
                raise ValueError(f"technique {entry['name']!r} appears under P{seen[entry['name']]} and P{number}")
            seen[entry["name"]] = number
    return {
        "schema": SCHEMA,
        "papers": [
            {"number": n, "short_name": rows[n]["short_name"], "title": titles[n], "techniques": rows[n]["techniques"]}
            for n in numbers
        ],
    }


def dumps(catalog: dict) -> str:
    return json.dumps(catalog, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m twinops.conformance.catalog",
        description="Generate the paper catalog JSON from papers.md and TECHNIQUES.md.",
    )
    parser.add_argument("--shared", type=Path, required=True, help="folder holding papers.md and TECHNIQUES.md")
    parser.add_argument("--out", type=Path, required=True, help="where to write papers.json")
    parser.add_argument("--check", action="store_true", help="exit 1 if --out differs instead of writing it")
    args = parser.parse_args(argv)
    text = dumps(build(args.shared))
    if args.check:
        current = args.out.read_text("utf-8") if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is out of date; regenerate it with --shared {args.shared}", file=sys.stderr)
            return 1
        print(f"{args.out} is current")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, "utf-8")
    catalog = json.loads(text)
    count = sum(len(p["techniques"]) for p in catalog["papers"])
    print(f"wrote {args.out}: {len(catalog['papers'])} papers, {count} techniques")
    return 0


if __name__ == "__main__":
    sys.exit(main())
