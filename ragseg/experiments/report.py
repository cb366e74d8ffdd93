"""What every experiment run writes into ``--out``: ``results.json`` (all numbers), ``results.md`` (its
tables), PNG plots (matplotlib, Agg) and ``index.html`` showing the tables and plots together. Every
table and plot carries the provenance line: the config, the database versions and the seeds."""

from __future__ import annotations

import html
import math
from typing import Any

from ragseg import io


def fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.{digits}f}"
    return str(v)


def provenance_line(p: dict) -> str:
    dbs = "; ".join(f"{k}: {v}" for k, v in p.get("databases", {}).items())
    seeds = p.get("seeds")
    return (f"config {p.get('config')} (hash {p.get('config_hash')}), proposals {p.get('proposals')}; "
            f"DBs {dbs or '-'}; seeds {seeds if seeds is not None else '-'}")


class Report:
    """Collects one experiment's tables and figures, then writes them (see the module docstring)."""

    def __init__(self, out: str, experiment: str, provenance: dict):
        self.out, self.experiment, self.provenance = out, experiment, provenance
        self.blocks: list[tuple[str, Any]] = []
        self.files: list[str] = []
        io.makedirs(out)

    @property
    def footer(self) -> str:
        return f"ragseg experiment {self.experiment} | " + provenance_line(self.provenance)

    def note(self, text: str) -> None:
        self.blocks.append(("note", text))

    def table(self, title: str, columns: list[str], rows: list[list[Any]], digits: int = 1) -> None:
        self.blocks.append(("table", (title, columns, [[fmt(v, digits) for v in r] for r in rows])))

    def figure(self, fig, name: str, caption: str) -> str:
        """Save ``fig`` as ``<out>/<name>.png`` with the provenance footer; returns the file name."""
        import textwrap

        import matplotlib.pyplot as plt

        foot = "\n".join(textwrap.wrap(self.footer, 160))
        fig.text(0.005, 0.003, foot, fontsize=5.5, color="#555555", va="bottom", ha="left")
        lines = foot.count("\n") + 1
        inches = fig.get_size_inches()[1]
        # room for the x label and tick labels (~0.55 in) and the footer (~0.1 in a line)
        fig.subplots_adjust(bottom=min(0.45, (0.6 + 0.1 * lines) / inches))
        fname = f"{name}.png"
        import io as _io

        buf = _io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        io.write_bytes_atomic(io.join(self.out, fname), buf.getvalue())
        self.files.append(fname)
        self.blocks.append(("figure", (fname, caption)))
        return fname

    # ------------------------------------------------------------------------------------------
    def markdown(self, title: str) -> str:
        lines = [f"# {title}", "", f"_{provenance_line(self.provenance)}_", ""]
        for kind, b in self.blocks:
            if kind == "note":
                lines += [b, ""]
            elif kind == "table":
                t, cols, rows = b
                lines += [f"**{t}**", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                lines += ["| " + " | ".join(r) + " |" for r in rows]
                lines.append("")
            else:
                fname, cap = b
                lines += [f"![{cap}]({fname})", "", f"_{cap}_", ""]
        return "\n".join(lines)

    def html(self, title: str) -> str:
        e = html.escape
        parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>"
                 "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;"
                 "margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
                 "th{background:#eee}td:first-child{text-align:left}img{max-width:100%;border:1px solid #ddd}"
                 ".prov{color:#555;font-size:0.85em}</style></head><body>",
                 f"<h1>{e(title)}</h1>", f"<p class='prov'>{e(provenance_line(self.provenance))}</p>"]
        for kind, b in self.blocks:
            if kind == "note":
                parts.append(f"<p>{e(b)}</p>")
            elif kind == "table":
                t, cols, rows = b
                parts.append(f"<h3>{e(t)}</h3><table><tr>" + "".join(f"<th>{e(c)}</th>" for c in cols) + "</tr>")
                parts += ["<tr>" + "".join(f"<td>{e(v)}</td>" for v in r) + "</tr>" for r in rows]
                parts.append("</table>")
            else:
                fname, cap = b
                parts.append(f"<figure><img src='{e(fname)}' alt='{e(cap)}'><figcaption>{e(cap)}</figcaption></figure>")
        parts.append("<p class='prov'>results.json holds every number; results.md the same tables.</p></body></html>")
        return "\n".join(parts)

    def write(self, title: str, results: dict) -> dict:
        doc = {"experiment": self.experiment, "provenance": self.provenance, **results,
               "files": {"results": "results.json", "table": "results.md", "html": "index.html", "plots": self.files}}
        io.write_json_atomic(io.join(self.out, "results.json"), doc)
        io.write_text_atomic(io.join(self.out, "results.md"), self.markdown(title))
        io.write_text_atomic(io.join(self.out, "index.html"), self.html(title))
        return doc


def index_page(out: str, runs: list[tuple[str, str]]) -> None:
    """``<out>/index.html`` linking each experiment's own page (``runs``: (name, title))."""
    e = html.escape
    body = "".join(f"<li><a href='{e(n)}/index.html'>{e(t)}</a> ({e(n)})</li>" for n, t in runs)
    io.write_text_atomic(io.join(out, "index.html"),
                         f"<!doctype html><html><head><meta charset='utf-8'><title>ragseg experiments</title></head>"
                         f"<body style='font-family:sans-serif'><h1>ragseg experiments</h1><ul>{body}</ul></body></html>")
