"""Page building: one self-contained HTML file per slide (images embedded), and the batch index.

Plain string building with :func:`html.escape`; every number the tests compare with the report
carries a ``data-qc`` attribute.
"""

from __future__ import annotations

import base64
import html
import json
from typing import Any
from urllib.parse import quote

from nuclick_wsi.qc.gallery import Crop

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.2em;color:#222;max-width:1500px}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f3f3f3}.num{text-align:right}.gal{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0;width:150px;font-size:.72em}figure img{display:block;border:1px solid #999}
.flag{color:#b00}.note{color:#555;font-size:.9em}.failed td{background:#fdecec}
th.sort{cursor:pointer}img.wide{max-width:100%}img.ov{max-width:100%;max-height:80vh}
.row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def img_tag(data: bytes, mime: str, alt: str, cls: str = "", qc: str = "") -> str:
    src = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    return (f'<img src="{src}" alt="{esc(alt)}"' + (f' class="{cls}"' if cls else "")
            + (f' data-qc="{qc}"' if qc else "") + ">")


def page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{_STYLE}</style></head><body>\n{body}\n</body></html>\n")


def kv_table(rows: list[tuple[str, Any, str]]) -> str:
    """Rows of (label, value, data-qc key or "")."""
    cells = "".join(f"<tr><th>{esc(k)}</th><td" + (f' data-qc="{q}"' if q else "") + f">{esc(v)}</td></tr>"
                    for k, v, q in rows)
    return f"<table>{cells}</table>"


def gallery(crops: list[Crop], measure: str, qc: str) -> str:
    figs = []
    for c in crops:
        o = c.outline
        area = f"{o.area_um2:.1f} um²" if o.area_um2 is not None else f"{o.area_px:.0f} px"
        flag = (f'<br><span class="flag">{esc("; ".join(c.flagged))}</span>') if c.flagged else ""
        figs.append(f"<figure>{img_tag(c.jpeg, 'image/jpeg', f'outline {o.label}')}<figcaption>#{o.label} "
                    f"{esc(o.class_name)}<br>{area}, {measure} {o.value:.3f}<br>click {o.index} at "
                    f"({o.x:.0f}, {o.y:.0f}){flag}</figcaption></figure>")
    return f'<div class="gal" data-qc="{qc}">' + "".join(figs) + "</div>" if figs else "<p>(none)</p>"


_SORT_JS = """
document.querySelectorAll('th.sort').forEach(function(th, col){th.addEventListener('click', function(){
 var tb=th.closest('table').tBodies[0], rows=Array.from(tb.rows), up=th.dataset.dir!=='up';
 th.dataset.dir=up?'up':'down';
 rows.sort(function(a,b){var x=a.cells[col].dataset.v||a.cells[col].textContent,
  y=b.cells[col].dataset.v||b.cells[col].textContent, nx=parseFloat(x), ny=parseFloat(y);
  var r=(!isNaN(nx)&&!isNaN(ny))?nx-ny:x.localeCompare(y); return up?r:-r;});
 rows.forEach(function(r){tb.appendChild(r);});});});
"""

INDEX_COLUMNS = ("stem", "status", "clicks", "segmented", "skipped", "median area um²", "flagged", "seconds", "report")


def index_page(title: str, rows: list[dict[str, Any]]) -> str:
    """A sortable table, one row per slide (failures first), linking each slide's report."""
    order = {"failed": 0, "running": 1, "pending": 2}
    rows = sorted(rows, key=lambda r: (order.get(r["status"], 3), r["stem"]))
    head = "".join(f'<th class="sort">{esc(c)}</th>' for c in INDEX_COLUMNS)
    body = []
    for r in rows:
        # a file name as a URL path: '#', '%', '?' and spaces in image names must not cut or alter the link
        link = f'<a href="{esc(quote(r["report"]))}">report</a>' if r.get("report") else esc(r.get("error", ""))
        cells = [esc(r["stem"]), esc(r["status"])]
        for key in ("clicks", "segmented", "skipped", "median_area_um2", "flagged", "seconds"):
            v = r.get(key)
            text = "" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))
            cells.append(f'<span data-qc="{key}">{esc(text)}</span>')
        tds = "".join(f'<td data-v="{esc(c) if k < 2 else ""}">{c}</td>' for k, c in enumerate(cells))
        body.append(f'<tr class="{esc(r["status"])}" data-stem="{esc(r["stem"])}">{tds}<td>{link}</td></tr>')
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return page(title, f"<h1>{esc(title)}</h1><p data-qc=\"summary\">{len(rows)} slide(s): {esc(summary)}</p>"
                       f"<table id=\"slides\"><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
                       f"<script>{_SORT_JS}</script>")


def json_block(data: Any) -> str:
    """Machine-readable figures of the page, for scripts and tests."""
    text = json.dumps(data).replace("</", "<\\/")
    return f'<script type="application/json" id="qc-data">{text}</script>'
