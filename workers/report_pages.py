"""The quality report's pages: PNG plots (score histograms, ROC, DET, a contact sheet) and the
self-contained report.html that shows them (plots embedded as data: URIs, every string escaped)."""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from models import quality as q

if TYPE_CHECKING:
    from workers.report import _Model

DPI = 100  # plots are 6 x 4 in at 100 dpi: 600 x 400 px
THUMB = 112  # contact sheet cell, px (the aligned crop size)
LABEL_W = 120  # contact sheet label column, px
PLOT_ORDER = ("scores_job", "scores_evaluator", "roc", "det", "contact_sheet")  # plots/<name>.png, as shown

# ---- plots ---------------------------------------------------------------------------------


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _score_plot(m: _Model) -> bytes:
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    group = 10 if m.genuine.bins % 10 == 0 else 1  # display bins of 10 score bins (0.01)
    edges = m.genuine.edges[::group]
    lo, hi = 1.0, -1.0
    for label, h, colour in (("genuine", m.genuine, "tab:blue"), ("impostor", m.impostor, "tab:red")):
        if h.n:
            counts = h.counts.reshape(-1, group).sum(axis=1)
            ax.stairs(counts / (h.n * (edges[1] - edges[0])), edges, label=f"{label} ({h.n} pairs)",
                      color=colour, fill=True, alpha=0.4)
            nz = np.flatnonzero(counts)
            lo, hi = min(lo, edges[nz[0]]), max(hi, edges[nz[-1] + 1])
    for value, text, style in ((_fmr_threshold(m), "FMR 1e-3", "--"), (m.published, "published", ":")):
        if value is not None:
            ax.axvline(value, color="black", linestyle=style, label=f"{text}: {value:.3f}")
    if lo < hi:
        ax.set_xlim(max(-1.0, lo - 0.05), min(1.0, hi + 0.05))
    ax.set(xlabel="cosine similarity", ylabel="density", title=f"{m.key}: {m.name}")
    ax.legend(fontsize="small")
    return _png(fig)


def _fmr_threshold(m: _Model) -> float | None:
    got = q.fnmr_at_fmr(m.rates, 1e-3) if m.rates is not None else None
    return got[1] if got else None


def _curve_plot(models: dict[str, _Model], det: bool) -> bytes:
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    plotted = False
    for m in models.values():
        if m.rates is None:
            continue
        _, fmr, fnmr = q.roc_points(m.rates)
        y = fnmr if det else 1 - fnmr
        keep = (fmr > 0) & (y > 0) if det else fmr > 0
        ax.plot(fmr[keep], y[keep], drawstyle="steps-post", label=f"{m.key}: {m.name}")
        plotted = plotted or bool(keep.any())
    if plotted:  # a log axis needs a positive value to draw (matplotlib raises on an empty one)
        ax.set_xscale("log")
        if det:
            ax.set_yscale("log")
    ax.set(xlabel="false match rate", ylabel="false non-match rate" if det else "true match rate",
           title="DET" if det else "ROC")
    if any(m.rates is not None for m in models.values()):
        ax.legend(fontsize="small")
        if not plotted:  # e.g. genuine and impostor scores apart at every threshold: no error to plot
            ax.text(0.5, 0.5, "no threshold with both error rates above zero", transform=ax.transAxes,
                    ha="center")
    else:
        ax.text(0.5, 0.5, "no genuine or impostor pairs", transform=ax.transAxes, ha="center")
    ax.grid(True, which="both", alpha=0.3)
    return _png(fig)


def contact_sheet(thumbnails: list[tuple[int, list[bytes]]]) -> bytes:
    """A PNG grid: one row per identity, its label on the left, its images at THUMB x THUMB px."""
    cols = max(len(images) for _, images in thumbnails)
    sheet = Image.new("RGB", (LABEL_W + cols * THUMB, len(thumbnails) * THUMB), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (identity, images) in enumerate(thumbnails):
        draw.text((6, r * THUMB + THUMB // 2 - 6), f"identity {identity}", fill="black")
        for c, data in enumerate(images):
            try:
                img = Image.open(io.BytesIO(data)).convert("RGB")
            except (OSError, ValueError) as e:
                raise ValueError(f"thumbnails: image {c} of identity {identity} does not decode: {e}") from e
            sheet.paste(img.resize((THUMB, THUMB)), (LABEL_W + c * THUMB, r * THUMB))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def plots(models: dict[str, _Model], thumbnails: list[tuple[int, list[bytes]]]) -> dict[str, bytes]:
    files = {f"plots/scores_{key}.png": _score_plot(m) for key, m in models.items()}
    files["plots/roc.png"] = _curve_plot(models, det=False)
    files["plots/det.png"] = _curve_plot(models, det=True)
    if any(images for _, images in thumbnails):
        files["plots/contact_sheet.png"] = contact_sheet([t for t in thumbnails if t[1]])
    return files


# ---- html ----------------------------------------------------------------------------------

_ROWS: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [  # (label, getter on a model summary)
    ("model", lambda s: s["name"]), ("EER", lambda s: s["eer"]),
    ("FNMR at FMR 1e-3", lambda s: s["fnmr_at_fmr"]["1e-3"]),
    ("threshold at FMR 1e-3", lambda s: s["threshold_at_fmr"]["1e-3"]),
    ("FNMR at FMR 1e-4", lambda s: s["fnmr_at_fmr"]["1e-4"]),
    ("threshold at FMR 1e-4", lambda s: s["threshold_at_fmr"]["1e-4"]),
    ("genuine mean cosine", lambda s: s["genuine_mean"]), ("impostor mean cosine", lambda s: s["impostor_mean"]),
    ("genuine pairs", lambda s: s["genuine_pairs"]), ("impostor pairs", lambda s: s["impostor_pairs"]),
    ("min centre angle (deg)", lambda s: s["min_centre_angle_deg"]),
    ("mean NN centre angle (deg)", lambda s: s["nn_centre_angle_deg_mean"]),
    ("close identities", lambda s: s["close_identities"]),
    ("close threshold", lambda s: s["close_threshold"]), ("label flips", lambda s: s["label_flips"]),
    ("intra-class cosine mean", lambda s: s["intra_class_cosine_mean"]),
    ("identities embedded (sample)", lambda s: _of(s, "identities")),
    ("images embedded (sample)", lambda s: _of(s, "images")),
    ("EER 95% half-width", lambda s: _conf(s, "eer_half_width")),
    ("FNMR at FMR 1e-3, 95% half-width", lambda s: _conf(s, "fnmr_half_width", "1e-3")),
    ("FNMR at FMR 1e-4, 95% half-width", lambda s: _conf(s, "fnmr_half_width", "1e-4")),
    ("impostor pairs above the FMR 1e-3 threshold", lambda s: _conf(s, "impostor_pairs_above_threshold", "1e-3")),
    ("impostor pairs above the FMR 1e-4 threshold", lambda s: _conf(s, "impostor_pairs_above_threshold", "1e-4")),
    ("FMR 1e-4 supported (>= 100 pairs above)", lambda s: _conf(s, "supported", "1e-4")),
]


def _of(s: dict[str, Any], key: str) -> str | None:
    """'k of n' of a model summary's sample, e.g. '63 of 1000'."""
    sample = s.get("sample")
    return None if sample is None else f"{sample[key]} of {sample['of_' + key]}"


def _conf(s: dict[str, Any], key: str, fmr: str | None = None) -> Any:
    got = (s.get("confidence") or {}).get(key)
    return got.get(fmr) if isinstance(got, dict) and fmr is not None else got


def fmt(v: Any) -> str:
    """How report.html shows a value: floats to 4 significant digits, None as n/a; escaped."""
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return html.escape(str(v))


def _table(head: list[str], rows: list[list[Any]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def render_html(data: dict[str, Any], files: dict[str, bytes]) -> str:
    """One self-contained page: summary tables, plots as data: URIs, close pairs, leakage pairs."""
    s = data["summary"]
    keys = [k for k in ("job", "evaluator") if s["models"][k] is not None]
    parts = [f"<h1>Quality report: job {html.escape(data['job_id'])}</h1>",
             _table(["", "images", "identities", "alignment failures"],
                    [["dataset", s["images"], s["identities"], s["alignment_failures"]]]),
             "<h2>Verification and separability</h2>",
             _table(["metric"] + keys, [[label] + [get(s["models"][k]) for k in keys] for label, get in _ROWS]),
             "<h2>Counts</h2>", _table(list(s["counts"]), [list(s["counts"].values())])]
    v = s.get("variations") or {}
    if v.get("cone"):
        cone = v["cone"]
        parts.insert(2, f"<p>Variations: uniform within {fmt(cone['half_angle_deg'])}&deg; of each identity's "
                        f"reference; the widest conditioning angle reached is {fmt(cone['max_angle_deg'])}&deg; "
                        f"({'within the cone' if cone['within'] else 'OUTSIDE the cone'}); mean cosine to the "
                        f"reference {fmt((v.get('reference_cosine') or {}).get('mean'))}.</p>")
    ex = s.get("exclusion")
    if ex:
        names = ", ".join(str(src.get("job") or src.get("reference_set")) for src in ex["sources"])
        parts.insert(2, f"<p>Exclusion: {fmt(ex['excluded'])} identities of {fmt(names)}; the nearest new "
                        f"identity is {fmt(ex['min_angle_deg'])}&deg; from them (at least "
                        f"{fmt(ex['bound_deg'])}&deg; asked).</p>")
    sample = data.get("evaluator_sample")
    if sample is not None:
        parts.insert(4, f"<p>Evaluator sample: {fmt(sample['identities'])} of {fmt(sample['of_identities'])} "
                        f"identities, {fmt(sample['images'])} of {fmt(sample['of_images'])} images "
                        f"({'every image' if sample['all'] else 'a seeded sample'}). {fmt(sample['rule'])} "
                        f"Confidence: {fmt(sample['confidence_rule'])}</p>")
    for name in (f"plots/{p}.png" for p in PLOT_ORDER):
        if name in files:
            uri = "data:image/png;base64," + base64.b64encode(files[name]).decode()
            parts.append(f'<figure><img alt="{html.escape(name)}" src="{uri}">'
                         f"<figcaption>{html.escape(name)}</figcaption></figure>")
    for k in keys:
        close = data["models"][k]["close_pairs"]
        parts.append(f"<h2>Close identity pairs ({html.escape(k)}, cosine &gt;= {fmt(close['threshold'])}: "
                     f"{fmt(close['rule'])})</h2>")
        parts.append(_table(["identity a", "identity b", "cosine"],
                            [[p["identity_a"], p["identity_b"], p["cosine"]] for p in close["top"]]))
        flips = data["models"][k]["label_flips"]["worst"]
        parts.append(f"<h2>Label flips ({html.escape(k)}), worst first</h2>")
        parts.append(_table(["identity", "sample", "own cosine", "other identity", "other cosine"],
                            [[e["identity"], e["sample"], e["own_cosine"], e["other_identity"],
                              e["other_cosine"]] for e in flips]))
    leak = data["leakage"]
    if leak is not None:
        parts.append(f"<h2>Leakage against {html.escape(leak['reference'])} (threshold {fmt(leak['threshold'])}): "
                     f"{fmt(leak['identities'])} identities, max cosine {fmt(leak['max_cosine'])}</h2>")
        parts.append(_table(["identity", "reference row", "cosine"],
                            [[p["identity"], p["reference_row"], p["cosine"]] for p in leak["top_pairs"]]))
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}img{max-width:100%}")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>idforge report '
            f"{html.escape(data['job_id'])}</title><style>{style}</style></head><body>"
            + "\n".join(parts) + "</body></html>\n")
