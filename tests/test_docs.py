"""The documentation: the README stays a front door, every relative link resolves, the site builds strictly.

Links are checked the way GitHub reads them (a path relative to the file, and an anchor that is one of the
target page's GitHub heading slugs); ``mkdocs build --strict`` checks them the way the site reads them
(mkdocs.yml sets link and anchor validation to warnings, which --strict turns into failures), and builds the
API reference from the docstrings.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_LIMIT = 15_000  # bytes: "under 15 KB"
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def markdown_files() -> list[Path]:
    """README.md and every page under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, inline code removed: where a link can be."""
    lines, in_fence = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            lines.append(re.sub(r"(`+).*?\1", "", line))
    return lines


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: the text lowercased, punctuation dropped, spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = text.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a markdown file's headings (duplicates numbered -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    in_fence = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and (m := HEADING.match(line)):
            slug = github_slug(m.group(2))
            out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return out


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """Every relative link in ``path`` whose file is missing, outside ``root``, or lacks the anchor."""
    broken = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(root)}: {target}"
            if not dest.is_relative_to(root) or not dest.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{where} (no heading with that anchor)")
    return broken


def test_readme_is_a_front_door_under_15_kb() -> None:
    """Small, and still opening with the two quick-start commands CI and new users run."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    size = len(text.encode("utf-8"))
    assert size < README_LIMIT, f"README.md is {size:,} bytes; move detail to docs/ (limit {README_LIMIT:,})"
    quick_start = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "\nmake train " in quick_start and "\nmake test " in quick_start, quick_start


def test_every_relative_link_in_the_readme_and_docs_resolves() -> None:
    files = markdown_files()
    assert len(files) > 15, [str(f) for f in files]  # the docs tree is there to be checked
    broken = [b for f in files for b in broken_links(f)]
    assert not broken, "\n".join(broken)


def test_the_link_checker_catches_a_missing_file_and_a_missing_anchor(tmp_path: Path) -> None:
    """The checker itself: a broken file link and a broken anchor are both reported, good ones are not."""
    page = ROOT / "docs" / "usage.md"
    (tmp_path / "ok.md").write_text("# A `code` title: with — punctuation\n\n## Twice\n\n## Twice\n")
    probe = tmp_path / "probe.md"
    probe.write_text(
        "[a](ok.md#a-code-title-with--punctuation) [b](ok.md#twice-1) [c](missing.md) "
        "[d](ok.md#nope) `[e](in-code.md)`\n```\n[f](in-fence.md)\n```\n[g](https://x.y/z)\n"
    )
    assert anchors(page)  # real pages have headings
    found = [b.split(": ", 1)[1] for b in broken_links(probe, tmp_path)]
    assert found == ["missing.md (no such file)", "ok.md#nope (no heading with that anchor)"], found


@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("mkdocs", "material", "mkdocstrings")),
    reason="the docs extra (mkdocs-material, mkdocstrings-python) is not installed",
)
def test_mkdocs_build_strict_passes(tmp_path: Path) -> None:
    """The site builds with no warning: every page in the nav, every link and anchor valid, the API pages built."""
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    api = (site / "reference" / "run" / "index.html").read_text(encoding="utf-8")
    assert "petuner.run_folder.load" in api  # mkdocstrings rendered the docstrings
    assert (site / "benchmarks" / "results" / "methods.png").exists()  # the hook served the figures
