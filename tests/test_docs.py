"""The documentation's links work: every relative link in README.md, docs/*.md and the results pages names a file that exists,
and every #anchor names a heading of its target (GitHub's heading ids), so a moved file or a renamed
section is caught here rather than by a reader."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "benchmarks").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def heading_id(text: str) -> str:
    """GitHub's id for a Markdown heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", text.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            slug = heading_id(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")  # GitHub numbers repeated headings
    return out


def links(path: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", path.read_text(encoding="utf-8")))


def test_heading_ids_follow_github():
    assert heading_id("The sixth run, 2026-12-05: the whole experiment as one run, 95 minutes") == \
        "the-sixth-run-2026-12-05-the-whole-experiment-as-one-run-95-minutes"
    assert heading_id("The paper's experiment in one command: `make reproduce-dpr`") == "the-papers-experiment-in-one-command-make-reproduce-dpr"
    assert heading_id("Reading the full test sets (all five)") == "reading-the-full-test-sets-all-five"


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for doc in DOCS:
        for target in links(doc):
            if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked here (no network)
                continue
            file, _, anchor = target.partition("#")
            dest = (doc.parent / file).resolve() if file else doc
            if not dest.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{doc.relative_to(ROOT)}: {target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, "\n".join(broken)
