"""Every relative link in the markdown pages resolves: the file exists and a ``#anchor`` is one of its headings.

Anchors are GitHub's heading slugs: the heading's rendered text lower-cased, every character that is not a
letter, digit, underscore, hyphen or space dropped, spaces turned into hyphens, and a repeated slug numbered
``-1``, ``-2``, ... in page order. Headings and links inside fenced code blocks or inline code are not markdown.
"""
import re
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = ["README.md", "CONTRIBUTING.md", "PERFORMANCE.md", "RESULTS.md"]
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def pages() -> List[Path]:
    return [ROOT / name for name in PAGES] + sorted((ROOT / "docs").glob("*.md"))


def prose_lines(text: str) -> Iterator[Tuple[int, str]]:
    """Numbered lines outside fenced code blocks, with inline code spans blanked."""
    fence = None
    for number, line in enumerate(text.split("\n"), 1):
        marker = re.match(r"\s*(```|~~~)", line)
        if marker:
            fence = None if fence == marker.group(1) else (fence or marker.group(1))
            continue
        if fence is None:
            yield number, re.sub(r"(`+)(.+?)\1", "", line)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text (markdown links reduced to their text, code spans to their content)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> Set[str]:
    """Every heading anchor of a markdown file, duplicates numbered as GitHub numbers them."""
    seen: Dict[str, int] = {}
    fence = None
    for line in path.read_text().split("\n"):
        marker = re.match(r"\s*(```|~~~)", line)
        if marker:
            fence = None if fence == marker.group(1) else (fence or marker.group(1))
            continue
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fence is None and heading:
            base = slug(heading.group(1))
            seen[base] = seen.get(base, -1) + 1
            seen.setdefault(f"{base}-{seen[base]}" if seen[base] else base, 0)
    return set(seen)


def broken_links(page: Path, root: Path = ROOT) -> List[str]:
    """``page:line: target (why)`` for each relative link of ``page`` that does not resolve."""
    broken = []
    for number, line in prose_lines(page.read_text()):
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
                continue
            path, _, anchor = target.partition("#")
            where = (page.parent / path).resolve() if path else page
            why = None
            if not where.exists():
                why = "no such file"
            elif anchor and (where.suffix != ".md" or anchor not in anchors(where)):
                why = f"no heading #{anchor} in {where.relative_to(root)}"
            if why:
                broken.append(f"{page.relative_to(root)}:{number}: {target} ({why})")
    return broken


def test_slugs_follow_github():
    assert slug("Result folders and `run.json`") == "result-folders-and-runjson"
    assert slug("KV quantization next to any method (`--quant kivi`)") == "kv-quantization-next-to-any-method---quant-kivi"
    assert slug("Perplexity at the memory held: KIVI, Quest, CAM, LaCache (CPU; issue 17, 2026-12-02)") == \
        "perplexity-at-the-memory-held-kivi-quest-cam-lacache-cpu-issue-17-2026-12-02"
    assert slug("central (outputs/central)") == "central-outputscentral"


def test_checker_finds_broken_links(tmp_path):
    (tmp_path / "b.md").write_text("# Title\n\n## Title\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md#title-1) [gone](c.md) [anchor](b.md#nope) [self](#here)\n"
                    "`[code](c.md)`\n```\n[fenced](c.md)\n# here\n```\n[web](https://example.com/x.md)\n")
    assert broken_links(page, tmp_path) == ["a.md:1: c.md (no such file)", "a.md:1: b.md#nope (no heading #nope in b.md)",
                                  "a.md:1: #here (no heading #here in a.md)"]


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []
