"""HTML of the feature browser: index.html (every shown latent in one table) and one page per latent.

Plain HTML with inline CSS and SVG: no script, no network, so the files open from disk anywhere.
A context is its tokens in order, each shaded orange in proportion to the latent's activation on it
(relative to the latent's highest activation in the scan); the activating token is boxed, and hovering
a token shows its activation.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from sae_sweep import rundir
from sae_sweep.features.scan import HIST_BINS, HIST_HI, HIST_LO

STYLE = """body{font-family:system-ui,sans-serif;max-width:1150px;margin:1.5em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:14px}th,td{padding:3px 8px;border-bottom:1px solid #ddd;
vertical-align:top;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
.ctx{font-family:ui-monospace,monospace;font-size:13px;white-space:pre-wrap;line-height:1.7;margin:0}
.ctx span{border-radius:2px}.ctx span.c{outline:1.5px solid #c33}.src{color:#777;font-size:12px}
ol.ctxs li{margin:.35em 0}.tok{font-family:ui-monospace,monospace;background:#f3f3f3;padding:0 3px;
white-space:pre}code{background:#f3f3f3}.note{color:#555}"""


def latent_file(latent: int) -> str:
    return f"latent_{latent:05d}.html"


def _tok(text: str) -> str:
    """A token as shown: whitespace made visible where it would vanish."""
    return html.escape(text.replace("\n", "↵\n").replace("\t", "→"))


def context_html(context: dict[str, Any], vocab: dict[str, str], max_act: float) -> str:
    """One context as a line of shaded tokens (the same markup in pages and notebooks)."""
    parts = []
    for i, (token, act) in enumerate(zip(context["token_ids"], context["acts"], strict=True)):
        alpha = 0.0 if max_act <= 0 else min(1.0, max(0.0, act / max_act))
        style = f"background:rgba(255,140,0,{alpha:.2f})" if alpha > 0 else ""
        cls = ' class="c"' if i == context["center"] else ""
        parts.append(f'<span{cls} style="{style}" title="{act:.3g}">{_tok(vocab[str(token)])}</span>')
    return f'<p class="ctx">{"".join(parts)}</p>'


def _source(context: dict[str, Any], doc_names: dict[str, str]) -> str:
    name = doc_names.get(str(context["doc"]), f"document {context['doc']}")
    act = context["acts"][context["center"]]
    return (
        f'<span class="src">{html.escape(name)}, token {context["pos"]} · activation {act:.3g} · '
        f"{html.escape(context['shard'])} row {context['shard_row']}</span>"
    )


def _contexts(items: list[dict[str, Any]], summary: dict[str, Any], max_act: float) -> str:
    if not items:
        return '<p class="note">none</p>'
    vocab, names = summary["vocab"], summary["doc_names"]
    rows = [f"<li>{_source(c, names)}{context_html(c, vocab, max_act)}</li>" for c in items]
    return f'<ol class="ctxs">{"".join(rows)}</ol>'


def _bars(counts: list[int], labels: list[str], width: int = 520, height: int = 120, title: str = "") -> str:
    """A small inline-SVG bar chart with the first, middle and last bin labelled."""
    top = max(max(counts), 1)
    bar_w = width / len(counts)
    scale = (height - 28) / top
    rects = "".join(
        f'<rect x="{i * bar_w:.1f}" y="{height - 18 - scale * c:.1f}" width="{bar_w * 0.9:.1f}" '
        f'height="{scale * c:.1f}" fill="#4a7fb5"><title>{html.escape(labels[i])}: {c}</title></rect>'
        for i, c in enumerate(counts)
    )
    ticks = "".join(
        f'<text x="{i * bar_w:.1f}" y="{height - 4}" font-size="10">{html.escape(labels[i])}</text>'
        for i in (0, len(counts) // 2, len(counts) - 1)
    )
    caption = f'<text x="0" y="10" font-size="11">{html.escape(title)}</text>'
    return f'<svg width="{width + 40}" height="{height}" role="img">{caption}{rects}{ticks}</svg>'


def _act_hist(hist: list[int]) -> str:
    w = (HIST_HI - HIST_LO) / HIST_BINS
    labels = [f"{10 ** (HIST_LO + i * w):.2g}" for i in range(HIST_BINS)]
    first = next((i for i, c in enumerate(hist) if c), 0)
    last = max((i for i, c in enumerate(hist) if c), default=HIST_BINS - 1)
    lo, hi = max(0, first - 2), min(HIST_BINS, last + 3)
    return _bars(hist[lo:hi], labels[lo:hi], title="activation when firing (log scale), held-out rows")


def _density_hist(d: dict[str, Any]) -> str:
    labels = [f"1e{e:.2g}" for e in d["edges"][:-1]]
    return _bars(d["counts"], labels, title=f"latent density (log10), alive latents; {d['dead']} never fired")


def _tokens(pairs: list[list[Any]], vocab: dict[str, str]) -> str:
    return " ".join(f'<span class="tok" title="{v:+.3g}">{_tok(vocab[str(t)])}</span>' for t, v in pairs)


def _head(title: str) -> str:
    return (
        f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>"
    )


def _run_line(s: dict[str, Any]) -> str:
    bits = [f"{s['architecture']} SAE, {s['hidden']} latents on d_in {s['d_in']}"]
    if s.get("model"):
        bits.append(f"{s['model']} {s['hook_name']}")
    bits.append(", ".join(f"{k} {v:.4g}" for k, v in s["metrics"].items()))
    bits.append(f"{s['alive']} of {s['hidden']} latents fired on {s['rows_scanned']} held-out rows")
    return "<p>" + " · ".join(html.escape(b) for b in bits if b) + "</p>"


def render_index(s: dict[str, Any]) -> str:
    title = f"Features: {Path(s['run_dir']).name}"
    parts = [
        _head(title),
        f"<h1>{html.escape(title)}</h1>",
        f"<p><code>{html.escape(s['run_dir'])}</code></p>",
    ]
    parts.append(_run_line(s))
    if not s["has_text"]:
        parts.append(
            '<p class="note">This data has no token provenance (it was not harvested from text by '
            "<code>python -m sae_sweep.harvest</code>): the pages show densities and activation "
            "histograms only.</p>"
        )
    parts.append(_density_hist(s["density_hist"]))
    head = "<tr><th>latent</th><th>density</th><th>max act</th>"
    head += "<th>top context</th><th>promotes</th></tr>" if s["has_text"] else "<th>activations</th></tr>"
    rows = []
    for r in s["latents"]:
        link = f'<a href="{latent_file(r["latent"])}">#{r["latent"]}</a>'
        cells = f'<td>{link}</td><td class="n">{r["density"]:.3g}</td><td class="n">{r["max_act"]:.3g}</td>'
        if s["has_text"]:
            ctx = context_html(r["top"][0], s["vocab"], r["max_act"]) if r["top"] else ""
            promotes = _tokens(r.get("promotes", [])[:4], s["vocab"]) if r.get("promotes") else ""
            cells += f"<td>{ctx}</td><td>{promotes}</td>"
        else:
            cells += f"<td>{_act_hist(r['hist'])}</td>"
        rows.append(f"<tr>{cells}</tr>")
    parts.append(f"<h2>{len(s['latents'])} latents, densest first</h2><table>{head}{''.join(rows)}</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render_latent(s: dict[str, Any], r: dict[str, Any], prev: int | None, nxt: int | None) -> str:
    title = f"Latent {r['latent']}"
    nav = ['<a href="index.html">all latents</a>']
    if prev is not None:
        nav.append(f'<a href="{latent_file(prev)}">← #{prev}</a>')
    if nxt is not None:
        nav.append(f'<a href="{latent_file(nxt)}">#{nxt} →</a>')
    parts = [_head(title), f"<p>{' · '.join(nav)}</p>", f"<h1>{html.escape(title)}</h1>"]
    parts.append(
        f"<p>density {r['density']:.4g} ({r['count']} of {s['rows_scanned']} held-out rows) · "
        f"max activation {r['max_act']:.4g}</p>"
    )
    parts.append(_act_hist(r["hist"]))
    if s["has_text"]:
        parts.append("<h2>Top activations</h2>" + _contexts(r["top"], s, r["max_act"]))
        parts.append("<h2>Random activating contexts</h2>" + _contexts(r["random"], s, r["max_act"]))
    if "promotes" in r:
        parts.append(
            "<h2>Logit effects (decoder direction through the unembedding)</h2>"
            f"<p>promotes: {_tokens(r['promotes'], s['vocab'])}</p>"
            f"<p>suppresses: {_tokens(r['suppresses'], s['vocab'])}</p>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def write_pages(summary: dict[str, Any], out: Path) -> None:
    latents = [r["latent"] for r in summary["latents"]]
    for i, r in enumerate(summary["latents"]):
        prev = latents[i - 1] if i > 0 else None
        nxt = latents[i + 1] if i + 1 < len(latents) else None
        rundir.write_text(out / latent_file(r["latent"]), render_latent(summary, r, prev, nxt))
    rundir.write_text(out / "index.html", render_index(summary))
