"""HTML pieces for self-contained reports: inline PNG figures, tables and the page frame.

Matplotlib runs with the Agg backend (no display needed); ``plt`` is exported so that report code draws
with the same pyplot this module configured.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from refdir.core.io import atomic_write_text  # noqa: E402
from refdir.core.rundir import RunDir  # noqa: E402

__all__ = ["CSS", "figure_html", "page_head", "plt", "table_html", "warnings_html", "write_sections_report"]

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:4px 8px;
vertical-align:top;text-align:left}th{background:#f3f3f3}img{max-width:100%}code{background:#f3f3f3}
.note{background:#fff8e1;padding:8px;border-left:4px solid #f0b400}"""

PAGE_TAIL = "</body></html>"


def page_head() -> str:
    """The opening of a report page, up to and including ``<body>``."""
    return f"<html><head><meta charset='utf-8'><title>refdir report</title><style>{CSS}</style></head><body>"


def warnings_html(warnings: list[str]) -> str:
    """Each warning as a highlighted note, for the top of a report."""
    return "".join(f"<p class='note'><b>Warning:</b> {html.escape(w)}</p>" for w in warnings)


def figure_html(fig) -> str:
    """A matplotlib figure as an inline ``<img>`` (the figure is closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"/>'


def table_html(rows: list[list], head: list[str]) -> str:
    """An HTML table with a header row; every cell is escaped."""
    h = "".join(f"<th>{html.escape(str(x))}</th>" for x in head)
    b = "".join("<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{b}</table>"


def write_sections_report(directory: str | Path) -> Path | None:
    """Write ``report.html`` of a directory that holds report sections but no run (e.g. an ``eval --out``
    directory): the sections alone, in name order. A run directory (one with a summary) is left alone and
    None returned: its full report is rendered by :func:`refdir.workflows.report.write_report`."""
    rd = RunDir(directory)
    if rd.summary() is not None:
        return None
    body = "\n".join(rd.sections())
    atomic_write_text(rd.report_path, f"{page_head()}<h1>refdir report</h1>{body}{PAGE_TAIL}")
    return rd.report_path
