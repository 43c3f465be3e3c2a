"""MkDocs hook: the docs link to files outside docs/ (BENCHMARKS.md, README.md, alerts/*.yml,
examples/detector.toml, ...) with paths that work on GitHub (``../alerts/x.yml``). In the site
those files would be missing, and `mkdocs build --strict` would call the links broken. This hook
copies every such linked file that exists into the site under ``repo/`` (Markdown ones become
pages, and their own links are followed the same way) and rewrites the links to it. A link to a
file that does not exist is left alone, so strict mode still fails on it.

It also writes ``runbooks/index.md``, a list of every runbook page, so the nav needs no list that
would go stale when an alert is added.
"""

from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path
from urllib.parse import unquote

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

PREFIX = "repo"
LINK = re.compile(r"(\]\()(<[^>]+>|[^)\s]+)((?:\s+\"[^\"]*\")?\))")
FENCE = re.compile(r"^\s*(```|~~~)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^/|^#")
_ORIGIN: dict[str, Path] = {}  # src_uri of every page → the file it was read from


def _targets(text: str):
    """(line number, match) of every inline link outside fenced code blocks."""
    fenced = False
    for i, line in enumerate(text.splitlines(keepends=True)):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            for m in LINK.finditer(line):
                yield i, m


def _resolve(origin: Path, target: str) -> tuple[Path, str] | None:
    target = target.strip("<>")
    if SCHEME.match(target):
        return None
    path, _, anchor = target.partition("#")
    if not path:
        return None
    return Path(os.path.normpath(origin.parent / unquote(path))), anchor


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def on_files(files: Files, config: MkDocsConfig) -> Files:
    docs = Path(config.docs_dir)
    repo = docs.parent
    _ORIGIN.clear()
    for f in files:
        if f.abs_src_path:
            _ORIGIN[f.src_uri] = Path(f.abs_src_path)
    runbooks = sorted((docs / "runbooks").glob("*.md"))
    if runbooks and files.get_file_from_path("runbooks/index.md") is None:
        listing = "# Runbooks\n\nOne page per alert: what it means, how to confirm it, what to do.\n\n" + "".join(
            f"- [{p.stem}]({p.name})\n" for p in runbooks if p.name != "index.md")
        files.append(File.generated(config, "runbooks/index.md", content=listing))
    queue = [uri for uri in _ORIGIN if uri.endswith(".md")]
    while queue:
        origin = _ORIGIN[queue.pop()]
        for _, m in _targets(origin.read_text(encoding="utf-8")):
            resolved = _resolve(origin, m[2])
            if resolved is None:
                continue
            path = resolved[0]
            if _inside(path, docs) or not _inside(path, repo) or not path.is_file() or ".git" in path.parts:
                continue
            uri = f"{PREFIX}/{path.relative_to(repo).as_posix()}"
            if files.get_file_from_path(uri) is None:
                files.append(File.generated(config, uri, abs_src_path=str(path)))
                _ORIGIN[uri] = path
                if uri.endswith(".md"):
                    queue.append(uri)
    return files


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    origin = _ORIGIN.get(page.file.src_uri)
    if origin is None:
        return markdown
    docs = Path(config.docs_dir)
    repo = docs.parent
    here = posixpath.dirname(page.file.src_uri)
    generated_page = not _inside(origin, docs)

    def rewrite(m: re.Match[str]) -> str:
        resolved = _resolve(origin, m[2])
        if resolved is None:
            return m[0]
        path, anchor = resolved
        if _inside(path, docs):
            if not generated_page:
                return m[0]  # a docs page's link into docs/: MkDocs checks it as written
            uri = path.relative_to(docs).as_posix()
            if path.is_dir() or files.get_file_from_path(uri) is None:
                index = f"{uri}/index.md".lstrip("./")
                if files.get_file_from_path(index) is None:
                    return m[0]
                uri = index
        elif _inside(path, repo) and files.get_file_from_path(f"{PREFIX}/{path.relative_to(repo).as_posix()}"):
            uri = f"{PREFIX}/{path.relative_to(repo).as_posix()}"
        else:
            return m[0]  # missing: left for --strict to report
        link = posixpath.relpath(uri, here or ".") + (f"#{anchor}" if anchor else "")
        return f"{m[1]}{link}{m[3]}"

    lines = markdown.splitlines(keepends=True)
    fenced = False
    for i, line in enumerate(lines):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines[i] = LINK.sub(rewrite, line)
    return "".join(lines)
