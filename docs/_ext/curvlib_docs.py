"""Sphinx extension of curvlib's documentation site (``docs/conf.py``).

- Docstrings are written for ``help()`` first, so some hold Markdown pipe tables (``| name |
  savefield |`` and a ``|---|---|`` row), which reStructuredText reads as substitution
  references: every such table becomes a ``list-table`` before autodoc parses the docstring.
- Markdown files included from outside ``docs/`` (``examples/README.md``,
  ``benchmarks/README.md``) link to files beside them (``results/cnn.md``): those links are
  resolved against the included file and become downloads, as images do with MyST's
  ``:relative-images:``, instead of references to documents that do not exist.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List

_ROW = re.compile(r"^(\s*)\|.*\|\s*$")
_SEPARATOR = re.compile(r"^\s*\|(\s*:?-+:?\s*\|)+\s*$")


def _cells(line: str) -> List[str]:
    """The cells of one ``| a | b |`` row; ``\\|`` is a literal bar inside a cell."""
    inner = line.strip()[1:-1]
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]


def markdown_tables_to_rst(lines: List[str]) -> List[str]:
    """``lines`` with every Markdown pipe table (header, separator, rows) as a ``list-table``."""
    out: List[str] = []
    i = 0
    while i < len(lines):
        row = _ROW.match(lines[i])
        if row and i + 1 < len(lines) and _SEPARATOR.match(lines[i + 1]):
            indent = row.group(1)
            rows = [_cells(lines[i])]
            j = i + 2
            while j < len(lines) and _ROW.match(lines[j]):
                rows.append(_cells(lines[j]))
                j += 1
            out += ["", f"{indent}.. list-table::", f"{indent}   :header-rows: 1", ""]
            for cells in rows:
                out.append(f"{indent}   * - {cells[0] or '..'}")
                out += [f"{indent}     - {c or '..'}" for c in cells[1:]]
            out.append("")
            i = j
        else:
            out.append(lines[i])
            i += 1
    return out


def _process_docstring(app, what, name, obj, options, lines: List[str]) -> None:
    lines[:] = markdown_tables_to_rst(lines)


_LINK = re.compile(r"(?<!!)(\[[^\]]*\])\((?![a-z][a-z0-9+.-]*:|#|/)([^)\s#]+)(#[^)\s]*)?\)")


def relative_links(text: str, included: Path, srcdir: Path) -> str:
    """``text`` of the file ``included`` with every relative ``[text](path)`` link to an existing
    file made a MyST download link ``[text](path:/P)``, ``P`` relative to ``srcdir``."""

    def fix(m: "re.Match[str]") -> str:
        target = (included.parent / m.group(2)).resolve()
        if not target.is_file():
            return m.group(0)
        return f"{m.group(1)}(path:/{os.path.relpath(target, srcdir)})"

    return _LINK.sub(fix, text)


def _include_read(app, relative_path, parent_docname, content: List[str]) -> None:
    srcdir = Path(app.srcdir).resolve()
    included = (srcdir / relative_path).resolve()
    if srcdir not in included.parents:  # a file from outside docs/
        content[0] = relative_links(content[0], included, srcdir)


def setup(app):
    app.connect("autodoc-process-docstring", _process_docstring)
    app.connect("include-read", _include_read)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
