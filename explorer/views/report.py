"""One run as a file to share: a self-contained HTML page (pictures embedded) and its JSON."""

from __future__ import annotations

import base64
import html
import io
import platform
from importlib.metadata import PackageNotFoundError, version

from . import clip, stages
from . import visual as vis

PACKAGES = ("torch", "transformers", "gradio", "pillow")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def data(result, full=None, drift: dict | None = None) -> dict:
    """The JSON of a run: its result, the full run's, the drift between them, and the versions."""
    extra = {"full": full.to_json() if full else None, "fidelity": drift}
    return {**result.to_json(), **extra, "versions": versions()}


def page(picture, result, full=None, drift: dict | None = None) -> str:
    """The HTML report: overlays and heatmaps on the image (on a clip, `picture` an `engine.video.Clip`: its
    strip of frames, each frame's dropped patches greyed and its kept count), the numbers, the answers and the
    settings."""
    g, selection = result.geometry, result.selection
    pictures = clip.strip(picture, g, selection, chosen=-1) if g.frames else figures(picture, g, selection)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
        for row in vis.metrics(result, full, drift)
    )
    settings = ", ".join(f"{k}={v}" for k, v in result.settings.items()) or "no settings"
    budget = result.budget or ("adaptive" if result.tokens.get("adaptive") else "none")
    note = " (random weights: the answers are gibberish)" if result.random_weights else ""
    parts = [
        f"<h1>{html.escape(result.method)} on {html.escape(result.model)}{note}</h1>",
        f"<p>Budget {html.escape(str(budget))}; {html.escape(settings)}; "
        f"{result.tokens['visual_kept']} of {result.tokens['visual_full']} visual tokens kept.</p>",
        _clip_line(picture) if g.frames else "",
        pictures,
        "<h2>Answers</h2>",
        f"<h3>Reduced</h3><pre class='answer'>{html.escape(result.answer)}</pre>",
    ]
    if full is not None:
        parts.append(f"<h3>Full</h3><pre class='answer'>{html.escape(full.answer)}</pre>")
    projected = result.cost.get("projected")
    real = (
        f"<p>Times and memory are measured on {html.escape(result.model)}; the rows under “computed: real "
        f"{html.escape(projected['model'].split('/')[-1])}” are computed from {html.escape(projected['model'])}'s "
        f"config ({projected['dtype']}) at this {'clip' if g.frames else 'image'}'s token counts, never measured.</p>"
        if projected
        else ""
    )
    parts += [
        "<h2>Numbers</h2>",
        "<table><tr><th></th><th>reduced</th><th>full</th><th>reduced / full</th></tr>" + rows + "</table>" + real,
        "<h2>Where the time goes</h2>",
        stages.html_of(result, full),
        "<h2>Method</h2>",
        _markdownish(vis.explain(result.method)),
        "<p class='versions'>" + html.escape(", ".join(f"{k} {v}" for k, v in versions().items())) + "</p>",
    ]
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        ".pictures{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0;max-width:48%}img{max-width:100%}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
        "td:first-child{text-align:left}pre{white-space:pre-wrap;background:#f6f6f6;padding:8px}"
    )
    title = f"Token-drop explorer: {result.method} on {result.model}"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(parts)}</body></html>"
    )


def figures(picture, g, selection) -> str:
    """HTML: each view of the image (the thumbnail, the crops) with the kept and dropped tokens drawn, and
    with the method's scores where it has any."""
    drawn = []
    for name, tokens in vis.views(g).items():
        drawn.append((f"{name}: kept and dropped", vis.overlay(picture, g, selection, tokens)))
        if selection.scores is not None and not selection.scores[tokens].isnan().all():
            drawn.append((f"{name}: scores", vis.heatmap(picture, g, selection.scores, tokens)))
    return (
        "<div class='pictures'>"
        + "".join(
            f"<figure><img src='{_png(image)}' alt='{html.escape(t)}'><figcaption>{html.escape(t)}</figcaption></figure>"
            for t, image in drawn
        )
        + "</div>"
    )


def _clip_line(shown) -> str:
    width, height = shown.size
    audio = "; its audio was ignored" if shown.audio else ""
    return f"<p>{len(shown.frames)} frames of {width}x{height} from a {shown.duration_s:.1f} s clip{audio}.</p>"


def _png(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _markdownish(text: str) -> str:
    """The method text, paragraph by paragraph, escaped (bold markers dropped)."""
    return "".join(f"<p>{html.escape(p.replace('**', ''))}</p>" for p in text.split("\n\n"))
