"""The HTML report of `headalloc reproduce`: per experiment, its figures and "paper vs measured"."""

from __future__ import annotations

import html
import json
from pathlib import Path

from headalloc.experiments.registry import Experiment, result_path
from headalloc.io import atomic_write_text, read_json


def _cell(v) -> str:
    if v is True:
        return '<td class="ok">yes</td>'
    if v is False:
        return '<td class="bad">no</td>'
    if v is None:
        return "<td></td>"
    return f"<td>{html.escape(str(v))}</td>"


def build_report(out: Path, exps: list[Experiment]) -> Path:
    """Write out/report.html from the stored results of `exps` (missing ones are listed as such)."""
    out = Path(out)
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>headalloc report</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px}.ok{background:#dfd}.bad{background:#fdd}"
             "img{max-width:520px;margin:4px}pre{background:#f6f6f6;padding:6px;overflow:auto}</style>",
             "</head><body><h1>headalloc: paper vs measured</h1>"]
    summary = []
    top = len(parts)  # the summary goes right under the page title, above every experiment
    for exp in exps:
        path = result_path(out, exp)
        parts.append(f"<h2 id='{exp.name}'>{html.escape(exp.title)} <small>({exp.name})</small></h2>")
        parts.append(f"<p>{html.escape(exp.description)}</p>")
        if not path.exists():
            parts.append("<p><b>not run</b></p>")
            summary.append((exp, None))
            continue
        rec = read_json(path)
        meta = rec.get("_meta", {})
        parts.append(f"<p>scale: {meta.get('scale')}, seed: {meta.get('seed')}, "
                     f"time: {meta.get('seconds')} s, finished {meta.get('finished')}</p>")
        rows = exp.table(rec)
        summary.append((exp, rows))
        if rows:
            cols = list(rows[0].keys())
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>")
            for r in rows:
                parts.append("<tr>" + "".join(_cell(r.get(c)) for c in cols) + "</tr>")
            parts.append("</table>")
        for png in sorted((out / exp.name).glob("*.png")):
            parts.append(f"<img src='{exp.name}/{png.name}' alt='{png.name}'>")
        if "config" in rec:
            parts.append("<details><summary>settings</summary><pre>"
                         + html.escape(json.dumps(rec["config"], indent=1)) + "</pre></details>")
    head = ["<h2>Summary</h2><table><tr><th>experiment</th><th>rows matching the paper / target</th></tr>"]
    for exp, rows in summary:
        if rows is None:
            head.append(f"<tr><td>{exp.name}</td><td>not run</td></tr>")
        else:
            judged = [r for r in rows if r.get("match") is not None]
            ok = sum(1 for r in judged if r.get("match"))
            head.append(f"<tr><td><a href='#{exp.name}'>{exp.name}</a></td><td>{ok} / {len(judged)}</td></tr>")
    head.append("</table>")
    parts[top:top] = head
    parts.append("</body></html>")
    return atomic_write_text(out / "report.html", "\n".join(parts))
