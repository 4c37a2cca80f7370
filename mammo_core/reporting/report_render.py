"""Render a report (a list of :class:`Section`) as Markdown, as self-contained HTML, and its tables as CSV.

The report's content is plain data built elsewhere (:mod:`mammo_core.reporting.report`); this module only turns it into
text. The HTML embeds every figure as a base64 data URI and carries its CSS inline, so the file opens offline
from an MLflow artifact view or a mail attachment, and it loads nothing from anywhere: no scripts, no
external stylesheets, no links out.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mammo_core.storage import stage_files
from mammo_core.storage.durable import write_bytes_atomic


@dataclass(frozen=True)
class Table:
    """A table shown in the report and written to ``tables/<name>.csv`` at full precision."""

    name: str
    frame: pd.DataFrame
    caption: str = ""
    index: bool = False  # whether the frame's index is a column of the table
    max_rows: int | None = None  # shown rows (the CSV always has all); a line says how many more there are


@dataclass(frozen=True)
class Figure:
    """A PNG produced by a stage; embedded in the HTML and copied next to the Markdown."""

    path: Path
    name: str
    caption: str = ""


@dataclass(frozen=True)
class Note:
    """A line of text. ``kind`` styles it: note, claim (the paper's), missing, not_run, warning."""

    text: str
    kind: str = "note"


@dataclass(frozen=True)
class Preformatted:
    """A block of verbatim text (params as JSON), collapsed in the HTML."""

    title: str
    text: str


Block = Table | Figure | Note | Preformatted


@dataclass
class Section:
    """A titled part of the report. ``lead`` sections come first, before the table of contents: what a
    reader must know before reading any number (what was measured on what, the verdicts)."""

    heading: str
    blocks: list[Block] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    lead: bool = False

    @property
    def anchor(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-")

    def add(self, block: Block) -> None:
        self.blocks.append(block)

    def note(self, text: str, kind: str = "note") -> None:
        self.blocks.append(Note(text, kind))


def format_value(value: object) -> str:
    """A cell as text: integers as integers, other numbers to 4 decimals without trailing zeros, NaN empty.

    Four decimals keep accuracies on small test sets exact enough to read (1/22 = 0.0455); the CSV under
    ``tables/`` keeps full precision.
    """
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int | float) or hasattr(value, "dtype"):
        try:
            number = float(value)  # numpy scalars too
        except (TypeError, ValueError):
            return str(value)
        if math.isnan(number):
            return ""
        if math.isinf(number):
            return "inf" if number > 0 else "-inf"
        if number.is_integer() and abs(number) < 1e15:
            return str(int(number))
        text = f"{number:.4f}".rstrip("0").rstrip(".")
        return text if text not in ("", "-0") else "0"
    return str(value)


def _table_rows(table: Table) -> tuple[list[str], list[list[str]]]:
    frame = table.frame.reset_index() if table.index else table.frame
    header = [str(c) for c in frame.columns]
    shown = frame if table.max_rows is None else frame.head(table.max_rows)
    rows = [[format_value(v) for v in row] for row in shown.itertuples(index=False, name=None)]
    return header, rows


def _hidden_rows(table: Table) -> str:
    more = len(table.frame) - (table.max_rows if table.max_rows is not None else len(table.frame))
    return f"{more} more rows in tables/{table.name}.csv" if more > 0 else ""


# ------------------------------------------------------------------------------------------------ Markdown


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(table: Table) -> str:
    header, rows = _table_rows(table)
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _lead_first(sections: Sequence[Section]) -> list[Section]:
    """Lead sections first (in their order), then the others: the table of contents goes between them."""
    return [s for s in sections if s.lead] + [s for s in sections if not s.lead]


def _n_lead(sections: Sequence[Section]) -> int:
    return sum(1 for s in sections if s.lead)


_NOTE_PREFIX = {"missing": "**Missing:** ", "warning": "**Warning:** "}


def render_markdown(title: str, sections: Sequence[Section], figure_dir: str = "figures") -> str:
    """The report as Markdown; figures are referenced as ``<figure_dir>/<name>`` (see :func:`write_report`)."""
    out = [f"# {title}", ""]
    ordered = _lead_first(sections)
    for section in ordered:
        if not section.lead and section is ordered[_n_lead(sections)]:
            out += [f"- [{s.heading}](#{s.anchor})" for s in sections] + [""]
        out += [f"## {section.heading}", ""]
        for block in section.blocks:
            if isinstance(block, Table):
                if block.caption:
                    out += [f"*{block.caption}* (tables/{block.name}.csv)", ""]
                out += [_md_table(block), ""]
                if _hidden_rows(block):
                    out += [f"... {_hidden_rows(block)}", ""]
            elif isinstance(block, Figure):
                out += [f"![{block.caption or block.name}]({figure_dir}/{block.name})", ""]
                if block.caption:
                    out += [f"*{block.caption}*", ""]
            elif isinstance(block, Note):
                out += [_NOTE_PREFIX.get(block.kind, "") + block.text, ""]
            elif isinstance(block, Preformatted):
                out += [f"**{block.title}**", "", "```", block.text, "```", ""]
        out += [f"Source: {s}  " for s in section.sources]
        out += [""]
    return "\n".join(out).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #444}h2{border-bottom:1px solid #bbb;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0 1em;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .55em;text-align:right}th{background:#f1f1f1}
td:first-child,th:first-child{text-align:left}
.caption{font-style:italic;color:#444;margin-bottom:.2em}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #ddd}figcaption{font-style:italic;color:#444}
.note{margin:.4em 0}.missing,.warning{background:#fff1f0;border-left:4px solid #c0392b;padding:.3em .6em}
.not_run{background:#fffbe6;border-left:4px solid #d4a017;padding:.3em .6em}
.claim{background:#eef5ff;border-left:4px solid #2e6bc6;padding:.3em .6em}
.source{font-family:ui-monospace,monospace;font-size:.8em;color:#555;margin:.1em 0}
pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:.8em}
nav ul{columns:3}
"""


def _html_table(table: Table) -> str:
    header, rows = _table_rows(table)
    esc = html.escape
    parts = []
    if table.caption:
        parts.append(f'<div class="caption">{esc(table.caption)} (tables/{esc(table.name)}.csv)</div>')
    parts.append("<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr></thead><tbody>")
    parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
    parts.append("</tbody></table>")
    if _hidden_rows(table):
        parts.append(f'<div class="caption">... {esc(_hidden_rows(table))}</div>')
    return "\n".join(parts)


def _html_figure(figure: Figure) -> str:
    data = base64.b64encode(Path(figure.path).read_bytes()).decode("ascii")
    alt = html.escape(figure.caption or figure.name, quote=True)
    caption = f"<figcaption>{html.escape(figure.caption)}</figcaption>" if figure.caption else ""
    return f'<figure><img alt="{alt}" src="data:image/png;base64,{data}">{caption}</figure>'


def render_html(title: str, sections: Sequence[Section]) -> str:
    """The report as one self-contained HTML page (inline CSS, figures as data URIs, no scripts or links out)."""
    esc = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{esc(title)}</title>",
           f"<style>{_CSS}</style></head><body>", f"<h1>{esc(title)}</h1>"]
    ordered = _lead_first(sections)
    for section in ordered:
        if not section.lead and section is ordered[_n_lead(sections)]:
            out.append("<nav><ul>")
            out += [f'<li><a href="#{s.anchor}">{esc(s.heading)}</a></li>' for s in sections]
            out.append("</ul></nav>")
        out.append(f'<section id="{section.anchor}"><h2>{esc(section.heading)}</h2>')
        for block in section.blocks:
            if isinstance(block, Table):
                out.append(_html_table(block))
            elif isinstance(block, Figure):
                out.append(_html_figure(block))
            elif isinstance(block, Note):
                prefix = esc(_NOTE_PREFIX.get(block.kind, "").replace("*", ""))
                out.append(f'<p class="note {esc(block.kind)}">{prefix}{esc(block.text)}</p>')
            elif isinstance(block, Preformatted):
                out.append(f"<details><summary>{esc(block.title)}</summary><pre>{esc(block.text)}</pre></details>")
        out += [f'<p class="source">Source: {esc(s)}</p>' for s in section.sources]
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------- writing


def _atomic_write(path: Path, data: bytes) -> None:
    write_bytes_atomic(path, data)


def write_report(title: str, sections: Sequence[Section], out_dir: Path) -> dict[str, Path]:
    """Write ``report.md``, ``report.html``, ``tables/*.csv`` and ``figures/*.png`` under ``out_dir``.

    Returns the written paths by role (``md``, ``html``, ``tables`` and ``figures`` folders).
    """
    out_dir = Path(out_dir)
    tables, figures = out_dir / "tables", out_dir / "figures"
    tables.mkdir(parents=True, exist_ok=True)
    figures.mkdir(parents=True, exist_ok=True)
    for section in sections:
        for block in section.blocks:
            if isinstance(block, Table):
                _atomic_write(tables / f"{block.name}.csv", block.frame.to_csv(index=block.index).encode("utf-8"))
            elif isinstance(block, Figure):
                _atomic_write(figures / block.name, Path(block.path).read_bytes())
    _atomic_write(out_dir / stage_files.REPORT.markdown, render_markdown(title, sections).encode("utf-8"))
    _atomic_write(out_dir / stage_files.REPORT.html, render_html(title, sections).encode("utf-8"))
    return {"md": out_dir / stage_files.REPORT.markdown, "html": out_dir / stage_files.REPORT.html, "tables": tables,
            "figures": figures}
