"""HTML building blocks of `lightgen-data inspect`: escaping, embedded images, tables and inline-SVG plots.

The page must open from disk with no network: images are `data:` URIs, styles are inline, plots are SVG drawn
here, there is no script. Every text that comes from the data (captions, ids, judge answers) goes through `esc`.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

CSS = """
body{font-family:sans-serif;margin:20px;max-width:1400px;color:#222} figure{margin:0}
h1{font-size:22px} h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ccc} h3{font-size:15px}
table{border-collapse:collapse;margin:8px 0 16px} td,th{padding:3px 8px;border-bottom:1px solid #eee;
text-align:left;vertical-align:top;font-size:13px} th{background:#f4f4f4}
.grid{display:flex;flex-wrap:wrap;gap:6px} .grid figure{margin:0;width:132px;font-size:11px}
figure img,.pair img{width:128px;height:128px;object-fit:contain;image-rendering:pixelated;background:#eee;
border:1px solid #ccc} figcaption{overflow:hidden;max-height:4.2em}
.pair{display:flex;gap:12px;border-bottom:1px solid #ddd;padding:8px 0} .pair .meta{font-size:12px;flex:1}
pre{white-space:pre-wrap;word-break:break-word;background:#f8f8f8;padding:4px;margin:2px 0;font-size:11px;
max-height:9em;overflow:auto} .muted{color:#777} .kept{color:#1a7f37} .removed{color:#b42318}
dl.counts{display:grid;grid-template-columns:max-content auto;gap:2px 12px} dl.counts dt{font-weight:bold}
dl.counts dd{margin:0} .plots svg{margin-right:12px;background:#fff;border:1px solid #ddd}
"""
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")


def esc(value: Any) -> str:
    """HTML-escaped text (quotes too, so it is safe inside attributes)."""
    return html.escape(str(value), quote=True)


def attrs(**kw: Any) -> str:
    """` name="value"` pairs, escaped; `data_x` becomes `data-x`, `class_` `class`; None values are left out."""
    return "".join(f' {k.rstrip("_").replace("_", "-")}="{esc(v)}"' for k, v in kw.items() if v is not None)


def tag(name: str, body: str = "", **kw: Any) -> str:
    """`<name attrs>body</name>` (`body` is HTML: escape text before passing it)."""
    return f"<{name}{attrs(**kw)}>{body}</{name}>"


def table(header: Sequence[str], rows: Iterable[str]) -> str:
    """A table with escaped header cells and `rows` given as ready `<tr>` HTML."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def cells(values: Sequence[Any], **kw: Any) -> str:
    """A `<tr>` of escaped cells."""
    return tag("tr", "".join(f"<td>{esc(v)}</td>" for v in values), **kw)


def png_uri(image: np.ndarray, max_side: int = 256) -> str:
    """An (H, W, 3) uint8 image as a PNG `data:` URI, shrunk to `max_side` if larger."""
    from PIL import Image

    img = Image.fromarray(image)
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_file_uri(data: bytes, max_side: int = 256) -> str | None:
    """Image file bytes (any format PIL reads) as a PNG `data:` URI; None when they do not decode."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return png_uri(np.asarray(img.convert("RGB")), max_side)
    except Exception:  # user data: any decoding failure is shown, never fatal
        return None


def img(uri: str | None, title: str = "", **kw: Any) -> str:
    """An `<img>` of a `data:` URI with a hover title, or a placeholder when the image did not decode."""
    if uri is None:
        return tag("span", "undecodable image", class_="muted", title=title, **kw)
    return f"<img{attrs(src=uri, title=title, alt=title[:80], **kw)}>"


def bar_chart(
    series: dict[str, Sequence[float]], labels: Sequence[str], title: str, w: int = 440, h: int = 200, **kw: Any
) -> str:
    """Grouped bars: one colour per series, one group per label; inline SVG."""
    n_groups, n_series = len(labels), max(1, len(series))
    top = max([float(v) for s in series.values() for v in s] + [1e-9])
    left, bottom, plot_h = 40, h - 28, h - 68
    group_w = (w - left - 10) / max(1, n_groups)
    bar_w = max(1.0, group_w * 0.8 / n_series)
    parts = [f'<svg width="{w}" height="{h}"{attrs(**kw)}>', f'<text x="{left}" y="14" font-size="12">{esc(title)}</text>',
             f'<text x="2" y="{bottom - plot_h + 4}" font-size="10">{top:.3g}</text>',
             f'<text x="2" y="{bottom}" font-size="10">0</text>',
             f'<line x1="{left}" y1="{bottom}" x2="{w - 10}" y2="{bottom}" stroke="#999"/>']  # fmt: skip
    for j, (name, values) in enumerate(series.items()):
        color = COLORS[j % len(COLORS)]
        for i, v in enumerate(values):
            bh = plot_h * float(v) / top
            x = left + i * group_w + group_w * 0.1 + j * bar_w
            parts.append(f'<rect x="{x:.1f}" y="{bottom - bh:.1f}" width="{bar_w:.1f}" height="{bh:.1f}" '
                         f'fill="{color}"><title>{esc(name)} {esc(labels[i])}: {float(v):.4g}</title></rect>')  # fmt: skip
        parts.append(f'<text x="{left + 110 * j}" y="30" font-size="11" fill="{color}">{esc(name)}</text>')
    step = max(1, n_groups // 12)
    for i in range(0, n_groups, step):
        x = left + (i + 0.5) * group_w
        parts.append(f'<text x="{x:.1f}" y="{h - 14}" font-size="10" text-anchor="middle">{esc(labels[i])}</text>')
    return "".join(parts) + "</svg>"


def line_chart(
    series: dict[str, Sequence[tuple[float, float]]],
    title: str,
    x_label: str = "x",
    w: int = 520,
    h: int = 200,
    **kw: Any,
) -> str:
    """Lines of (x, y) points on shared axes, one colour per series; inline SVG (empty when there are no points)."""
    pts = [p for s in series.values() for p in s]
    if not pts:
        return ""
    (x0, y0), (x1, y1) = np.min(pts, axis=0), np.max(pts, axis=0)
    sx = lambda x: 40 + (w - 50) * (x - x0) / max(x1 - x0, 1e-9)
    sy = lambda y: h - 25 - (h - 40) * (y - y0) / max(y1 - y0, 1e-9)
    parts = [f'<svg width="{w}" height="{h}"{attrs(**kw)}>', f'<text x="40" y="14" font-size="12">{esc(title)}</text>']
    parts.append(f'<text x="2" y="{sy(y1) + 4:.0f}" font-size="10">{y1:.3g}</text>')
    parts.append(f'<text x="2" y="{sy(y0):.0f}" font-size="10">{y0:.3g}</text>')
    parts.append(f'<text x="{w - 60}" y="{h - 5}" font-size="10">{esc(x_label)} {x1:.0f}</text>')
    for i, (name, s) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.2" points="{path}"/>')
        parts.append(f'<text x="{w - 150}" y="{30 + 12 * i}" font-size="11" fill="{color}">{esc(name)}</text>')
    return "".join(parts) + "</svg>"


def histogram(values: Sequence[int] | np.ndarray, title: str, bins: int = 24, **kw: Any) -> str:
    """A histogram of integer values as an SVG bar chart."""
    v = np.asarray(values)
    if v.size == 0:
        return tag("p", "no values", class_="muted")
    edges = np.unique(np.linspace(v.min(), v.max() + 1, min(bins, int(v.max() - v.min()) + 1) + 1).astype(int))
    counts, _ = np.histogram(v, bins=edges)
    labels = [str(a) if b - a <= 1 else f"{a}-{b - 1}" for a, b in zip(edges[:-1], edges[1:], strict=True)]
    return bar_chart({"rows": counts.tolist()}, labels, title, **kw)


def page(title: str, body: str, **kw: Any) -> str:
    """The whole self-contained document."""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{CSS}</style></head><body{attrs(**kw)}>{body}</body></html>\n")  # fmt: skip
