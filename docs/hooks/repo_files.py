"""mkdocs hook: serve the repository files the pages link to (results, configs, notebooks, code).

The pages link to files outside ``docs/`` as ``../benchmarks/results/<file>``, ``../conf/...`` and so on,
so that the same link works on GitHub, where ``docs/`` is just a folder of the repository. mkdocs resolves
a page's links against ``docs/``; a file registered with the source path ``../<folder>/<file>`` is exactly
what such a link names, so mkdocs validates it, copies (or renders) it into the site and rewrites the link
to where it lands. Copying the files into ``docs/`` instead would keep a second copy that drifts.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files, InclusionLevel

# repository folder → the kinds of file the pages may link to there (.md: rendered as a page)
SHARED = {
    "benchmarks/results": {".png", ".md", ".json", ".csv"},
    "benchmarks": {".py"},
    "conf": {".yaml"},
    "notebooks": {".ipynb"},
    "petuner": {".py"},
    "tests": {".py"},
}


def _dest(uri: str, directory_urls: bool) -> str:
    """Where a file lands in the site: result tables (.md) render as pages, the rest is copied as is."""
    if not uri.endswith(".md"):
        return uri
    stem = uri.removesuffix(".md")
    return f"{stem}/index.html" if directory_urls else f"{stem}.html"


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Register each shared file under ``../<its path in the repository>``, outside the nav."""
    repo = Path(config.docs_dir).parent
    for folder, kinds in SHARED.items():
        for path in sorted(p for p in (repo / folder).rglob("*") if p.is_file() and p.suffix in kinds):
            uri = path.relative_to(repo).as_posix()
            files.append(
                File(
                    f"../{uri}",
                    config.docs_dir,
                    config.site_dir,
                    config.use_directory_urls,
                    inclusion=InclusionLevel.NOT_IN_NAV,
                    dest_uri=_dest(uri, config.use_directory_urls),
                )
            )
    return files
