"""HTML pieces of the experiment report: number formatting, tables, and plotly figures.

The page must open offline (a cluster node, a laptop on a train), so plotly.js is embedded in the
file: the first figure of a :class:`Page` carries the bundle (``include_plotlyjs=True``) and every
later one reuses it (``include_plotlyjs=False``). No script is loaded from the network.
"""
from __future__ import annotations

import html
import math
import re
from numbers import Number

STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em;color:#222}"
         "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}"
         "th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}"
         "figure{display:inline-block;margin:6px;vertical-align:top}img{max-width:560px}"
         "figcaption{font-size:12px;color:#555}div.wide{overflow-x:auto}div.figs{display:flex;flex-wrap:wrap}"
         "div.fig{width:560px;margin:4px}p.note{font-size:13px;color:#555}")
FIGURE_SIZE = (560, 380)  # px; two figures side by side on a laptop screen


# a number as Python or a CSV writes one; an exponent needs its sign, so that a hexadecimal trial
# id such as 12e45678 stays text
NUMBER = re.compile(r"[+-]?(\d+|\d*\.\d+|\d+\.\d*)([eE][+-]\d+)?|[+-]?(inf|nan)", re.IGNORECASE)


class Text(str):
    """A cell that is text even when it looks like a number (a trial id such as 00123456)."""


def as_number(value):
    """``value`` as an int or float when it is one (or a numeric string), else None."""
    if isinstance(value, (bool, Text)):
        return None
    if isinstance(value, Number):
        return value
    if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
        text = value.strip()
        return int(text) if text.lstrip("+-").isdigit() else float(text)
    return None


def fmt(value, digits: int = 4) -> str:
    """A number to ``digits`` significant digits (0.0017128179054138398 -> 0.001713, 0.179993 ->
    0.18); integers (also integral floats such as epochs read back as 6.0) as integers; other
    text as it is; NaN, None and empty as a dash."""
    if value is None or value == "":
        return "–"
    number = as_number(value)
    if number is None:
        return str(value)
    if math.isnan(number):
        return "–"
    if math.isinf(number):
        return str(number)
    if float(number).is_integer() and abs(number) < 1e15:
        return str(int(number))
    text = f"{number:.{digits}g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}e{int(exponent)}"
    return text


def table(header: list, rows: list[list], raw: bool = False) -> str:
    """An HTML table; numbers are formatted by :func:`fmt` and right-aligned. ``raw``: cells are
    trusted HTML (already escaped)."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for cell in row:
            if as_number(cell) is not None:
                cells.append(f"<td class='num'>{html.escape(fmt(cell))}</td>")
            else:
                cells.append(f"<td>{cell if raw else html.escape(fmt(cell))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<div class='wide'><table><tr>{head}</tr>{''.join(body)}</table></div>"


def tidy_figure(fig, title: str | None = None):
    """Readable defaults for a report figure: its size, 4 significant digits on hover and axes."""
    width, height = FIGURE_SIZE
    fig.update_layout(width=width, height=height, margin=dict(l=50, r=20, t=40, b=40), font=dict(size=11),
                      **({"title": dict(text=title, font=dict(size=13))} if title else {}))
    fig.update_xaxes(hoverformat=".4g")
    fig.update_yaxes(hoverformat=".4g")
    return fig


class Page:
    """An HTML page that embeds plotly.js once, with the first figure."""

    def __init__(self, title: str):
        self.title = title
        self.parts: list[str] = []
        self._plotlyjs_written = False

    def add(self, fragment: str) -> None:
        self.parts.append(fragment)

    def figure_html(self, fig) -> str:
        """One figure as a ``<div>`` (interactive, offline)."""
        import plotly.io as pio

        snippet = pio.to_html(fig, full_html=False, include_plotlyjs=not self._plotlyjs_written,
                              include_mathjax=False, config={"displaylogo": False, "responsive": False})
        self._plotlyjs_written = True
        return f"<div class='fig'>{snippet}</div>"

    def figures(self, figs: list) -> None:
        if figs:
            self.add("<div class='figs'>" + "".join(self.figure_html(f) for f in figs) + "</div>")

    def render(self) -> str:
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{STYLE}</style></head><body>{''.join(self.parts)}</body></html>")
