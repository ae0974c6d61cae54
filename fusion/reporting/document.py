"""A report as a list of blocks, rendered to Markdown and to a self-contained HTML page.

Blocks: :class:`Heading`, :class:`Paragraph`, :class:`Table` (cells already formatted as text,
some of them bold) and :class:`Figure` (a PNG and an SVG under ``figures/``). The Markdown links
the PNG files; the HTML embeds every PNG as a ``data:`` URI and has no outside reference (no
script, no stylesheet link, no web font), so it opens offline as a single file.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import pathlib

from fusion.evaluation import format_table

__all__ = ["Figure", "Heading", "Paragraph", "Table", "render_html", "render_markdown"]


@dataclasses.dataclass
class Heading:
    text: str
    level: int = 2


@dataclasses.dataclass
class Paragraph:
    text: str


@dataclasses.dataclass
class Table:
    """A table of text cells; ``bold`` holds the (row, column) positions to emphasise."""

    columns: list
    rows: list
    bold: set = dataclasses.field(default_factory=set)
    caption: str | None = None


@dataclasses.dataclass
class Figure:
    """A figure written as ``figures/<name>.png`` and ``.svg`` under the report folder."""

    name: str
    caption: str
    png: pathlib.Path
    svg: pathlib.Path


def _markdown_table(table: Table) -> str:
    rows = []
    for i, row in enumerate(table.rows):
        cells = {}
        for j, (column, cell) in enumerate(zip(table.columns, row)):
            text = str(cell).replace("|", "\\|")
            cells[column] = f"**{text}**" if (i, j) in table.bold else text
        rows.append(cells)
    return format_table(rows, columns=list(table.columns))


def render_markdown(blocks) -> str:
    """The blocks as Markdown (figures link ``figures/<name>.png``)."""
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Paragraph):
            parts.append(block.text)
        elif isinstance(block, Table):
            if block.caption:
                parts.append(block.caption)
            parts.append(_markdown_table(block) if block.rows else "(no rows)")
        elif isinstance(block, Figure):
            parts.append(f"![{block.caption}](figures/{block.png.name})\n\n*{block.caption}*")
        else:
            raise TypeError(f"unknown report block {type(block).__name__}")
    return "\n\n".join(parts) + "\n"


_STYLE = """
body { font-family: sans-serif; max-width: 70em; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left; }
th { background: #f2f2f2; }
td.best { font-weight: bold; background: #eef6ee; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; }
figcaption, p.caption { font-style: italic; color: #555; }
code { background: #f6f6f6; }
"""


def _inline(text: str) -> str:
    """Escape ``text``; `backticked` spans become <code> and **starred** spans <strong>."""
    out = []
    for i, piece in enumerate(str(text).split("`")):
        escaped = html.escape(piece)
        if i % 2:
            out.append(f"<code>{escaped}</code>")
            continue
        for j, part in enumerate(escaped.split("**")):
            out.append(f"<strong>{part}</strong>" if j % 2 else part)
    return "".join(out)


def _html_table(table: Table) -> str:
    lines = []
    if table.caption:
        lines.append(f'<p class="caption">{_inline(table.caption)}</p>')
    lines.append("<table>")
    lines.append("<tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
                 + "</tr>")
    for i, row in enumerate(table.rows):
        cells = []
        for j, cell in enumerate(row):
            cls = ' class="best"' if (i, j) in table.bold else ""
            cells.append(f"<td{cls}>{html.escape(str(cell))}</td>")
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def _html_figure(figure: Figure) -> str:
    data = base64.b64encode(figure.png.read_bytes()).decode("ascii")
    caption = html.escape(figure.caption)
    return (f'<figure id="{html.escape(figure.name)}"><img alt="{caption}" '
            f'src="data:image/png;base64,{data}"><figcaption>{caption}</figcaption></figure>')


def _html_paragraph(text: str) -> str:
    """A paragraph, or a bullet list when every line starts with ``- ``."""
    lines = text.splitlines()
    if lines and all(line.startswith("- ") for line in lines):
        return "<ul>" + "".join(f"<li>{_inline(line[2:])}</li>" for line in lines) + "</ul>"
    return f"<p>{_inline(text)}</p>"


def render_html(blocks, title: str) -> str:
    """The blocks as one self-contained HTML page (figures embedded as PNG data URIs)."""
    body = []
    for block in blocks:
        if isinstance(block, Heading):
            level = min(max(block.level, 1), 6)
            body.append(f"<h{level}>{_inline(block.text)}</h{level}>")
        elif isinstance(block, Paragraph):
            body.append(_html_paragraph(block.text))
        elif isinstance(block, Table):
            body.append(_html_table(block) if block.rows else "<p>(no rows)</p>")
        elif isinstance(block, Figure):
            body.append(_html_figure(block))
        else:
            raise TypeError(f"unknown report block {type(block).__name__}")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
