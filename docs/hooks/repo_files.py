"""mkdocs hook: serve the benchmark results that live outside ``docs/`` under the paths the pages use.

The pages link to ``../benchmarks/results/<file>`` so that the same link works on GitHub, where
``docs/`` is just a folder of the repository. mkdocs resolves a page's links against ``docs/``; a
file registered with the source path ``../benchmarks/results/<file>`` is exactly what such a link names,
so mkdocs validates it, copies (or renders) it into the site and rewrites the link to where it lands.
Copying the files into ``docs/`` instead would keep a second copy that drifts from the benchmarks'.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files, InclusionLevel

SHARED = ("benchmarks/results",)  # repository folders the pages may link into
KINDS = {".png", ".md", ".json", ".csv"}


def _dest(folder: str, path: Path, directory_urls: bool) -> str:
    """Where a file lands in the site: result tables (.md) render as pages, the rest is copied."""
    if path.suffix != ".md":
        return f"{folder}/{path.name}"
    return f"{folder}/{path.stem}/index.html" if directory_urls else f"{folder}/{path.stem}.html"


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Register every result file under ``../<folder>/<name>``, outside the nav."""
    docs = Path(config.docs_dir)
    for folder in SHARED:
        for path in sorted((docs.parent / folder).iterdir()):
            if path.suffix in KINDS:
                files.append(
                    File(
                        f"../{folder}/{path.name}",
                        config.docs_dir,
                        config.site_dir,
                        config.use_directory_urls,
                        inclusion=InclusionLevel.NOT_IN_NAV,
                        dest_uri=_dest(folder, path, config.use_directory_urls),
                    )
                )
    return files
