"""The documentation's relative links lead somewhere, and the README stays a short guide.

Every relative link in README.md and docs/*.md names an existing file, and a `file.md#anchor` (or
`#anchor`) link names a heading of that file, anchored as GitHub anchors them. Files only: no
server, no cluster (the fast tier).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README_MAX_LINES = 250
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)[^`]*?\1")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def prose(text: str) -> str:
    """The Markdown without fenced blocks and code spans, where nothing is a link or a heading."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: the heading's text lowercased, every character that is not a
    letter, digit, space, hyphen or underscore dropped, spaces turned to hyphens; a repeated
    anchor gets -1, -2, … in order."""
    seen: Counter[str] = Counter()
    found = set()
    for heading in HEADING.findall(FENCE.sub("", text)):
        heading = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        found.add(f"{slug}-{seen[slug]}" if seen[slug] else slug)
        seen[slug] += 1
    return found


def broken_links(page: Path) -> list[str]:
    """The relative links of `page` whose file or heading anchor does not exist."""
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:: not relative
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
            broken.append(f"{target}: no heading with anchor #{anchor} in {file.name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file_and_heading(page):
    assert broken_links(page) == []


def test_the_docs_exist_and_the_readme_is_a_short_guide():
    assert {p.name for p in PAGES} >= {"README.md", "guide.md", "method.md", "reference.md", "results.md"}
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move detail to docs/"


def test_a_broken_file_or_anchor_is_found(tmp_path):
    """The check itself: a missing file, a missing anchor and a link in code (ignored)."""
    (tmp_path / "other.md").write_text("# The `make demo` run: what it prints\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "page.md"
    page.write_text("# Top\n\n[ok](other.md#the-make-demo-run-what-it-prints) [ok](other.md#twice-1) [ok](#top)\n"
                    "![gone](missing.png) [gone](other.md#nowhere) [gone](#bottom) [web](https://example.com/x)\n"
                    "`[code](missing.md)`\n\n```\n[fenced](missing.md)\n# not a heading\n```\n")
    assert anchors((tmp_path / "other.md").read_text()) == {"the-make-demo-run-what-it-prints", "twice", "twice-1"}
    assert [b.split(":")[0] for b in broken_links(page)] == ["missing.png", "other.md#nowhere", "#bottom"]
