"""A self-contained HTML report: inline CSS, figures inlined as base64 PNG, no external assets."""

from __future__ import annotations

import base64
import html

from .plots import Figure
from .tables import Results, Summary, detail, failures, headline, legend

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1280px;
color:#1d2330;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #dde}
.meta,.legend,.note{color:#555;font-size:13px}.note{font-style:italic}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #d6d9e0;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f1f3f8}td.held{background:#e3f5e4}td.partial{background:#fff4d6}td.broken{background:#fde2e1}
figure{margin:16px 0}figure img{max-width:100%;border:1px solid #eee}figcaption{color:#444;font-size:13px}
"""


def _table(cols, rows, ticks, table_id: str = "") -> str:
    ident = f' id="{table_id}"' if table_id else ""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = []
    for r, k in zip(rows, ticks):
        cells = "".join(f'<td class="{x}">{html.escape(v)}</td>' if x else f"<td>{html.escape(v)}</td>"
                        for v, x in zip(r, k))
        body.append(f"<tr>{cells}</tr>")
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _figure(f: Figure) -> str:
    title = html.escape(f.title)
    if f.png is None:
        return f'<h3>{title}</h3><p class="note" id="{f.key}">Skipped: {html.escape(f.note or "no data")}.</p>'
    data = base64.b64encode(f.png).decode("ascii")
    note = f'<p class="note">{html.escape(f.note)}</p>' if f.note else ""
    return (f'<figure id="{f.key}"><img alt="{title}" src="data:image/png;base64,{data}">'
            f"<figcaption><b>{title}.</b> {html.escape(f.caption)}</figcaption></figure>{note}")


def _privacy(res: Results, rows: list[Summary]) -> str:
    if not res.privacy:
        return ('<p class="note">No leakage audit in this store (add <code>privacy: {seeds: 3, steps: 200}</code> '
                "to the grid).</p>")
    body = []
    for s in rows:
        vals = res.privacy.get(s.defense)
        if not vals:
            continue
        rule = res.privacy_rules.get(s.defense) or []
        rule_s = " -> ".join(" ".join(str(x) for x in step) for step in rule) or "update passes unchanged"
        body.append([s.defense, rule_s, ", ".join(f"{v:.1f}" for v in vals), f"{s.psnr:.1f}"])
    return _table(["Defense", "Transforms applied to the single update", "PSNR per seed (dB)", "Median (dB)"],
                  body, [[None] * 4 for _ in body], "privacy-table")


def render(res: Results, rows: list[Summary], figures: list[Figure], title: str = "phalanx: attacks x defenses") -> str:
    """The whole report as one HTML string."""
    cols, text, ticks = headline(res, rows)
    seeds = sorted({r.seed for r in res.runs})
    meta = (f"Store: {html.escape(res.db)} &middot; {len(res.runs)} finished cells, {len(res.failed)} failed, "
            f"{res.missing} not run yet "
            f"&middot; {len(res.defenses)} defenses x {len(res.attacks)} attacks x {len(seeds)} seed(s) "
            f"&middot; settings: {html.escape('; '.join(f'{d}, {p}, byzantine {b:g}' for d, p, b in res.scenarios))}")
    def per_attack(score: str) -> str:
        return (f"Final {score} % ± std [min–max over seeds] and peak over rounds; backdoors: ASR % [min–max] "
                f"and main {score}." if len(seeds) > 1 else
                f"Final {score} % and peak over rounds (one seed); backdoors: ASR % and main {score}.")

    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1><p class=\"meta\">{meta}</p>",
             "<h2>Comparative table</h2>", _table(cols, text, ticks, "comparative-table"),
             f'<p class="legend">{html.escape(legend(res))}</p>']
    for s in res.scenarios:
        c, t, k = detail(res, rows, s)
        parts += [f"<h2>Per attack: {html.escape(f'{s[0]}, {s[1]}, byzantine {s[2]:g}')}</h2>",
                  f'<p class="legend">{per_attack("AUPRC" if res.metric(s) == "auprc" else "accuracy")}</p>',
                  _table(c, t, k)]
    if res.failed:
        c, t = failures(res)
        parts += ["<h2>Failed runs</h2>", '<p class="legend">Runs the defense could not complete under the '
                  "attack; each counts as accuracy 0 above.</p>", _table(c, t, [[None] * len(c) for _ in t],
                                                                       "failed-runs")]
    parts += ["<h2>Leakage audit</h2>", _privacy(res, rows), "<h2>Figures</h2>"]
    parts += [_figure(f) for f in figures]
    parts.append("</body></html>")
    return "\n".join(parts)
