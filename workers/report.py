"""The quality report of a job (stage `evaluating`): report.json, PNG plots and report.html.

`build_report` reads the dataset's features shard by shard, in two passes over `inputs.shards()`:

  1. per shard and model: every genuine pair's cosine into a score histogram, each identity's
     centre and intra-class consistency, alignment failures, and the images of the impostor subset;
     then all cross-identity pairs of that subset (tiled) into the impostor histogram, the error
     rates, centre separability and close identity pairs;
  2. per shard: label flips, i.e. images closer to another identity's centre than to their own.

Memory is the centres [N, E], the impostor subset [<= impostor_images, E] and one shard, never
every image's features. The metrics' exact definitions are in `models.quality`.

The evaluator may have embedded a sample of whole identities only (`workers.shard.evaluator_identities`:
the other identities' rows are NaN). Its figures are then the sample's: genuine pairs, centres,
separability and label flips among the sampled identities, impostor pairs among all the sampled images
(or, past `impostor_images` of them, the subset rule restricted to them). Each model's summary states
its `sample` and the `confidence` its pair counts give (`confidence`: normal-approximation 95%
half-widths that treat pairs as independent, so lower bounds; docs/outputs.md, "Evaluator sample").
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from models import quality as q
from models.seeding import REPORT_IMPOSTOR, derive_seed, make_generator
from workers.report_pages import LABEL_W, PLOT_ORDER, THUMB, contact_sheet, fmt, plots, render_html
from workers.shard import EVALUATOR_SAMPLE_RULE

__all__ = ["LABEL_W", "PLOT_ORDER", "THUMB", "contact_sheet", "fmt", "render_html"]

FMRS = {"1e-3": 1e-3, "1e-4": 1e-4}  # operating points reported, by their summary key
TOP_K = 20  # examples kept per list (worst identities, label flips, leakage pairs)
Z95 = 1.959964  # two-sided 95% normal quantile, for the confidence half-widths
SUPPORTED_PAIRS = 100  # FNMR at an FMR is "supported" with at least this many impostor pairs above its threshold
CLOSE_TOP_K = 50  # close centre pairs listed per model
SUBSET_RULE = (
    "all images when identities x images_per_identity <= cap; otherwise every identity gives "
    "floor(cap / identities) images and (cap mod identities) identities, the first of a permutation "
    "of the identities seeded with derive_seed(seed, 'report.impostor'), give one more; identity i's "
    "images are the first of a permutation of its samples seeded with derive_seed(seed, "
    "'report.impostor', i). Impostor pairs: every pair of subset images of different identities."
)


@dataclass
class ShardFeatures:
    identities: list[int]  # global identity indices of this shard, length n
    job: torch.Tensor  # float [n, A, E] unit embeddings by the job's FR model
    evaluator: torch.Tensor | None  # float [n, A, 128] unit SFace embeddings (NaN rows: not sampled), or None
    aligned: torch.Tensor  # bool [n, A]: the face was found and aligned
    samples: torch.Tensor | None = None  # int [n, A]: each image's sample index (None: 0..A-1)


@dataclass
class Leakage:
    reference: str  # the reference set's name
    embeddings: torch.Tensor  # [M, E] unit embeddings in the job FR model's space
    threshold: float  # cosine at or above which an identity counts as leaked


@dataclass
class ReportInputs:
    job_id: str
    embedder: str  # job FR model name
    evaluator: str | None  # e.g. "sface-2021dec-int8bq"; None when not run
    evaluator_threshold: float | None  # e.g. 0.363 (SFace's published same-person cosine)
    identities: int
    images_per_identity: int
    seed: int  # for any deterministic subsampling
    shards: Callable[[], Iterable[ShardFeatures]]  # may be called several times (one call = one pass)
    thumbnails: list[tuple[int, list[bytes]]]  # a few identities' encoded JPEG/PNG images (contact sheet)
    counts: dict[str, int]  # requested, rendered, alignment_failures, filtered, topped_up (passed through)
    leakage: Leakage | None = None
    impostor_images: int = 20_000  # cap on images used for impostor pairs (deterministic subset from seed)
    # What the variations did (`workers.finalize.realised`): the method, realised cosines to the
    # references and, for cone variations, the cone and the widest angle reached. Passed through.
    variations: dict[str, Any] | None = None
    # `sampler.exclude`'s outcome (`workers.exclusion.enforce`): the least angle reached to the
    # excluded identities, the bound, the sources. Passed through.
    exclusion: dict[str, Any] | None = None


@dataclass
class Report:
    summary: dict[str, Any]  # small: goes into the job's result
    data: dict[str, Any]  # report.json (includes "summary")
    files: dict[str, bytes]  # relative name -> bytes: "report.json", "report.html", "plots/<name>.png"
    # bool [N, A]: image (identity, slot) lies closer to another identity's centre (job FR model);
    # slots follow each shard's image order. None with a single identity.
    label_flips: torch.Tensor | None = None


@dataclass
class _Model:
    """One FR model's accumulators over the passes."""
    key: str  # "job" or "evaluator"
    name: str
    n: int  # identities
    published: float | None = None  # the model's published same-person threshold, if any
    per_identity: int = 0  # A, images per identity
    dim: int = 0  # embedding size, set by the first shard
    genuine: q.ScoreHistogram = field(default_factory=q.ScoreHistogram)
    impostor: q.ScoreHistogram = field(default_factory=q.ScoreHistogram)
    centres: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # [N, E]
    intra: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # [N]
    subset: list[torch.Tensor] = field(default_factory=list)  # impostor subset rows [k, E] per shard
    subset_labels: list[torch.Tensor] = field(default_factory=list)  # their identities [k] per shard
    evaluated: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.bool))  # [N]
    every: list[torch.Tensor] | None = field(default_factory=list)  # all embedded rows, while <= cap
    every_labels: list[torch.Tensor] = field(default_factory=list)
    every_count: int = 0
    impostor_source: str = "subset"  # which images gave the impostor pairs: subset, sample, sample_subset
    flips: int = 0
    flip_mask: torch.Tensor | None = None  # bool [N, A]
    flip_first: list[dict[str, Any]] = field(default_factory=list)
    flip_worst: list[dict[str, Any]] = field(default_factory=list)
    rates: q.ErrorRates | None = None


def build_report(inputs: ReportInputs) -> Report:
    """Evaluate the dataset with the job's FR model and the evaluator; render report.json/html and plots."""
    _check_inputs(inputs)
    n, a = inputs.identities, inputs.images_per_identity
    models = {"job": _Model("job", inputs.embedder, n, per_identity=a, every=None)}  # the job embeds every image
    if inputs.evaluator is not None:
        models["evaluator"] = _Model("evaluator", inputs.evaluator, n, inputs.evaluator_threshold, per_identity=a)
    quota = impostor_quota(n, a, inputs.impostor_images, inputs.seed)  # [N]
    failures = torch.zeros(n, dtype=torch.long)  # [N] alignment failures per identity
    labels: list[torch.Tensor] = []
    for shard in _pass(inputs):
        ids = torch.tensor(shard.identities, dtype=torch.long)  # [n_s]
        failures[ids] = (~shard.aligned.cpu()).sum(dim=1)
        rows, samples = _subset_picks(shard.identities, quota, a, inputs.seed)
        labels.append(ids[rows])
        for m, x, keep in _features(models, shard):  # x [n_s, A, E]; keep [n_s]: identities embedded
            xs, ids_m = x[keep], ids[keep]  # [k_s, A, E], [k_s]
            m.evaluated[ids_m] = True
            m.genuine.add(q.genuine_scores(xs))  # [k_s, A(A-1)/2]
            c = q.centres(xs)  # [k_s, E]
            m.centres[ids_m], m.intra[ids_m] = c, q.intra_class_cosine(xs, c)
            picked = keep[rows]  # [k]
            m.subset.append(x[rows[picked], samples[picked]])  # [k', E]
            m.subset_labels.append(ids[rows[picked]])
            if m.every is not None:  # every embedded image, while they fit under the cap
                m.every_count += xs.shape[0] * a
                if m.every_count > inputs.impostor_images:
                    m.every, m.every_labels = None, []
                else:
                    m.every.append(xs.reshape(-1, xs.shape[2]))
                    m.every_labels.append(ids_m.repeat_interleave(a))
    subset_labels = torch.cat(labels)  # [S]
    details = {key: _evaluate(m) for key, m in models.items()}
    if n >= 2:
        for shard in _pass(inputs):
            for m, x, keep in _features(models, shard):
                _add_flips(m, x, shard.identities, shard.samples, keep)
    leak = _leakage(inputs.leakage, models["job"].centres) if inputs.leakage else None
    summary = {
        "images": n * a, "identities": n,
        "models": {"job": _model_summary(models["job"], details["job"]),
                   "evaluator": _model_summary(models["evaluator"], details["evaluator"])
                   if "evaluator" in models else None},
        "alignment_failures": int(failures.sum()),
        "counts": dict(inputs.counts),
        "leakage": leak[0] if leak else None,
        "variations": inputs.variations,
        "exclusion": inputs.exclusion,
    }
    worst_align = torch.argsort(failures, descending=True, stable=True)[:TOP_K]
    data = {
        "format": "idforge.report/1", "job_id": inputs.job_id, "summary": summary,
        "scores": {"bins": q.DEFAULT_BINS, "bin_width": 2 / q.DEFAULT_BINS, "range": [-1, 1],
                   "accept": "cosine >= threshold; thresholds are bin edges"},
        "impostor_subset": {"cap": inputs.impostor_images, "images": int(subset_labels.numel()),
                            "identities": int(torch.unique(subset_labels).numel()), "rule": SUBSET_RULE},
        "models": {"job": _model_detail(models["job"], details["job"]),
                   "evaluator": _model_detail(models["evaluator"], details["evaluator"])
                   if "evaluator" in models else None},
        "alignment": {"failures": int(failures.sum()),
                      "worst_identities": [{"identity": int(i), "failures": int(failures[i])}
                                           for i in worst_align if failures[i] > 0]},
        "leakage": leak[1] if leak else None,
        "evaluator_sample": None if "evaluator" not in models else {
            **_sample(models["evaluator"]), "rule": EVALUATOR_SAMPLE_RULE,
            "impostor_images": models["evaluator"].impostor_source,
            "confidence_rule": CONFIDENCE_RULE},
    }
    files = plots(models, inputs.thumbnails)
    files["report.json"] = json.dumps(data, indent=1, sort_keys=True).encode()
    files["report.html"] = render_html(data, files).encode()
    return Report(summary=summary, data=data, files=files, label_flips=models["job"].flip_mask)


# ---- inputs and passes ---------------------------------------------------------------------


def _check_inputs(inputs: ReportInputs) -> None:
    if inputs.identities < 1 or inputs.images_per_identity < 1:
        raise ValueError(f"identities={inputs.identities} and images_per_identity="
                         f"{inputs.images_per_identity} must be >= 1")
    if inputs.impostor_images < 2:
        raise ValueError(f"impostor_images: must be >= 2, got {inputs.impostor_images}")
    if inputs.leakage is not None:
        emb = inputs.leakage.embeddings
        if emb.ndim != 2 or emb.shape[0] == 0:
            raise ValueError(f"leakage.embeddings: expected [M >= 1, E], got {tuple(emb.shape)}")
        q.check_unit(emb, "leakage.embeddings")
        if not -1 <= inputs.leakage.threshold <= 1:
            raise ValueError(f"leakage.threshold: must lie in [-1, 1], got {inputs.leakage.threshold}")


def _pass(inputs: ReportInputs) -> Iterable[ShardFeatures]:
    """One pass over the shards, checked: shapes, unit norms, each identity exactly once."""
    n, a = inputs.identities, inputs.images_per_identity
    seen = torch.zeros(n, dtype=torch.bool)
    for k, shard in enumerate(inputs.shards()):
        ids = shard.identities
        where = f"shard {k}"
        if shard.job.ndim != 3 or shard.job.shape[:2] != (len(ids), a):
            raise ValueError(f"{where}: job features must be [{len(ids)}, {a}, E], got {tuple(shard.job.shape)}")
        if shard.aligned.dtype != torch.bool or tuple(shard.aligned.shape) != (len(ids), a):
            raise ValueError(f"{where}: aligned must be bool [{len(ids)}, {a}], got "
                             f"{shard.aligned.dtype} {tuple(shard.aligned.shape)}")
        if (shard.evaluator is None) != (inputs.evaluator is None):
            raise ValueError(f"{where}: evaluator features must be given exactly when inputs.evaluator is set")
        if shard.evaluator is not None and (shard.evaluator.ndim != 3
                                            or shard.evaluator.shape[:2] != (len(ids), a)):
            raise ValueError(f"{where}: evaluator features must be [{len(ids)}, {a}, D], "
                             f"got {tuple(shard.evaluator.shape)}")
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ValueError(f"{where}: identities {bad[:5]} lie outside [0, {n})")
        t = torch.tensor(ids, dtype=torch.long)
        if bool(seen[t].any()) or len(set(ids)) != len(ids):
            raise ValueError(f"{where}: identities appear twice in one pass")
        seen[t] = True
        yield shard
    if not bool(seen.all()):
        missing = (~seen).nonzero(as_tuple=True)[0][:5].tolist()
        raise ValueError(f"shards cover {int(seen.sum())} of {n} identities (missing e.g. {missing})")


def _features(models: dict[str, _Model], shard: ShardFeatures
              ) -> Iterable[tuple[_Model, torch.Tensor, torch.Tensor]]:
    """Each model's float32 CPU features of the shard and which of its identities the model embedded
    (bool [n_s]; NaN rows: not sampled), checked; the first shard sizes the accumulators."""
    for key, m in models.items():
        raw = shard.job if key == "job" else shard.evaluator
        assert raw is not None  # _pass checked it
        x = raw.detach().float().cpu()  # [n_s, A, E]
        if m.dim == 0:
            m.dim = x.shape[2]
            m.centres, m.intra = torch.zeros(m.n, m.dim), torch.full((m.n,), float("nan"))
            m.evaluated = torch.zeros(m.n, dtype=torch.bool)
        finite = x.isfinite().all(dim=2)  # [n_s, A]
        keep = finite.all(dim=1)  # [n_s]
        if key == "job" and not bool(keep.all()):
            raise ValueError("job features: every image must be embedded (found non-finite rows)")
        partial = finite.any(dim=1) & ~keep
        if bool(partial.any()):
            raise ValueError(f"{key} features: identity {shard.identities[int(partial.nonzero()[0])]} is embedded "
                             "in part; the evaluator samples whole identities")
        q.check_unit(x[keep], f"{key} features", m.dim)
        yield m, x, keep


def impostor_quota(identities: int, per_identity: int, cap: int, seed: int) -> torch.Tensor:
    """Images each identity gives to the impostor subset (see SUBSET_RULE): [N] int64, sum min(cap, N*A)."""
    if identities * per_identity <= cap:
        return torch.full((identities,), per_identity, dtype=torch.long)
    base, extra = divmod(cap, identities)
    order = make_generator(derive_seed(seed, REPORT_IMPOSTOR)).permutation(identities)
    quota = torch.full((identities,), base, dtype=torch.long)
    quota[order[:extra]] += 1
    return quota


def _subset_picks(ids: list[int], quota: torch.Tensor, a: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row in the shard, sample) of the shard's impostor-subset images: ([k], [k])."""
    rows, samples = [], []
    for r, i in enumerate(ids):
        k = int(quota[i])
        if k == a:
            picked = torch.arange(a)
        else:
            gen = make_generator(derive_seed(seed, REPORT_IMPOSTOR, i))
            picked = gen.permutation(a)[:k].sort().values
        rows.append(torch.full((k,), r, dtype=torch.long))
        samples.append(picked)
    return torch.cat(rows), torch.cat(samples)


# ---- metrics -------------------------------------------------------------------------------


def _evaluate(m: _Model) -> dict[str, Any]:
    """Impostor scores, error rates, thresholds and centre separability of one model after pass 1."""
    if bool(m.evaluated.all()) or m.every is None:  # everyone embedded, or the sample is over the cap
        subset, labels = torch.cat(m.subset), torch.cat(m.subset_labels)  # [S, E], [S]
        m.impostor_source = "subset" if bool(m.evaluated.all()) else "sample_subset"
    else:  # a sample within the cap: all its images
        subset, labels = torch.cat(m.every), torch.cat(m.every_labels)
        m.impostor_source = "sample"
    m.subset, m.subset_labels, m.every, m.every_labels = [], [], None, []
    for scores in q.impostor_scores(subset, labels):
        m.impostor.add(scores)
    d: dict[str, Any] = {"eer": None, "eer_threshold": None,
                         "fnmr_at_fmr": dict.fromkeys(FMRS), "threshold_at_fmr": dict.fromkeys(FMRS)}
    if m.genuine.n and m.impostor.n:
        m.rates = q.error_rates(m.genuine, m.impostor)
        d["eer"], d["eer_threshold"] = q.equal_error_rate(m.rates)
        for key, fmr in FMRS.items():
            got = q.fnmr_at_fmr(m.rates, fmr)
            if got is not None:
                d["fnmr_at_fmr"][key], d["threshold_at_fmr"][key] = got
    if m.published is not None:
        d["close_threshold"], d["close_threshold_rule"] = m.published, "published same-person threshold"
    elif d["threshold_at_fmr"]["1e-3"] is not None:
        d["close_threshold"], d["close_threshold_rule"] = d["threshold_at_fmr"]["1e-3"], "threshold at FMR 1e-3"
    elif d["eer_threshold"] is not None:
        d["close_threshold"], d["close_threshold_rule"] = d["eer_threshold"], \
            "threshold at the EER (too few impostor pairs for FMR 1e-3)"
    else:
        d["close_threshold"], d["close_threshold_rule"] = None, "none: no genuine or impostor pairs"
    d["nn_deg"] = None
    d["close"] = q.ClosePairs([], 0, 0)
    where = m.evaluated.nonzero(as_tuple=True)[0]  # [K] the identities embedded
    if where.numel() >= 2:
        centres = m.centres[where]  # [K, E]
        sep = q.separability(centres)
        d["nn_deg"] = torch.rad2deg(sep.nn_angle).double()  # [K]
        if d["close_threshold"] is not None:
            close = q.close_pairs(centres, d["close_threshold"], CLOSE_TOP_K)
            d["close"] = q.ClosePairs([(int(where[i]), int(where[j]), v) for i, j, v in close.pairs],
                                      close.count, close.identities)
    d["confidence"] = confidence(m.genuine.n, m.impostor.n, d["eer"], d["fnmr_at_fmr"])
    return d


CONFIDENCE_RULE = (
    "95% normal-approximation half-widths, pairs taken as independent (they share images and "
    "identities, so the true uncertainty is larger): a rate p from n pairs has half-width "
    "1.96 sqrt(p(1-p)/n), p floored at 1/n; EER: half the root sum of squares of its genuine and "
    "impostor half-widths; FNMR at FMR f: from the genuine pairs; the threshold at FMR f rests on "
    "f x impostor pairs, so the realised FMR is known to a relative 1.96 / sqrt(f x impostor pairs); "
    f"'supported' when that is at least {SUPPORTED_PAIRS} pairs (about +-20%).")


def _half_width(p: float, n: int) -> float | None:
    if n <= 0:
        return None
    p = min(max(p, 1 / n), 1 - 1 / n) if n > 1 else 0.5
    return Z95 * math.sqrt(p * (1 - p) / n)


def confidence(genuine: int, impostor: int, eer: float | None,
               fnmr: dict[str, float | None]) -> dict[str, Any]:
    """The 95% half-widths that the pair counts give the error rates (CONFIDENCE_RULE)."""
    out: dict[str, Any] = {"level": 0.95, "eer_half_width": None, "fnmr_half_width": {},
                           "impostor_pairs_above_threshold": {}, "fmr_relative_half_width": {},
                           "supported": {}}
    if eer is not None:
        g, i = _half_width(eer, genuine), _half_width(eer, impostor)
        out["eer_half_width"] = _r(math.hypot(g, i) / 2) if g is not None and i is not None else None
    for key, fmr in FMRS.items():
        above = fmr * impostor
        out["impostor_pairs_above_threshold"][key] = round(above, 1)
        out["fmr_relative_half_width"][key] = _r(Z95 / math.sqrt(above)) if above > 0 else None
        out["supported"][key] = above >= SUPPORTED_PAIRS
        value = fnmr.get(key)
        out["fnmr_half_width"][key] = _r(_half_width(value, genuine)) if value is not None else None
    return out


def _sample(m: _Model) -> dict[str, Any]:
    """The identities and images the model embedded, of the dataset's."""
    k, a = int(m.evaluated.sum()), m.per_identity
    return {"identities": k, "images": k * a, "of_identities": m.n, "of_images": m.n * a,
            "all": k == m.n}


def _add_flips(m: _Model, x: torch.Tensor, ids: list[int], samples: torch.Tensor | None,
               keep: torch.Tensor) -> None:
    """Pass 2: count one shard's label flips, mark them, and keep the first and worst examples.
    keep [n_s]: the shard's identities the model embedded; flips are among the embedded centres."""
    if m.flip_mask is None:
        m.flip_mask = torch.zeros(m.n, x.shape[1], dtype=torch.bool)
    where = m.evaluated.nonzero(as_tuple=True)[0]  # [K] global ids of the centres compared against
    if not bool(keep.any()) or where.numel() < 2:
        return
    x, ids = x[keep], [i for i, k in zip(ids, keep.tolist()) if k]
    if samples is not None:
        samples = samples[keep]
    n_s, a, _ = x.shape
    row_of = torch.full((m.n,), -1, dtype=torch.long)
    row_of[where] = torch.arange(where.numel())
    own = row_of[torch.tensor(ids, dtype=torch.long)].repeat_interleave(a)  # [n_s * A] rows of the centres
    f = q.label_flips(x.reshape(n_s * a, -1), own, m.centres[where])
    m.flips += f.count
    m.flip_mask[torch.tensor(ids, dtype=torch.long)] = f.flipped.view(n_s, a)
    sample_of = samples.reshape(-1).tolist() if samples is not None else [p % a for p in range(n_s * a)]

    def example(p: int) -> dict[str, Any]:
        return {"identity": ids[p // a], "sample": sample_of[p], "own_cosine": _r(f.own[p]),
                "other_identity": int(where[int(f.other_index[p])]), "other_cosine": _r(f.other[p])}

    m.flip_first += [example(p) for p in f.first(TOP_K - len(m.flip_first))]
    worst = m.flip_worst + [example(p) for p in f.worst(TOP_K)]
    worst.sort(key=lambda e: (-(e["other_cosine"] - e["own_cosine"]), e["identity"], e["sample"]))
    m.flip_worst = worst[:TOP_K]


def _leakage(leak: Leakage, centres: torch.Tensor) -> tuple[dict[str, Any], dict[str, Any]]:
    """(summary, detail) of the identities' closeness to the reference set."""
    ref = leak.embeddings.detach().float().cpu()  # [M, E]
    if ref.shape[1] != centres.shape[1]:
        raise ValueError(f"leakage.embeddings: {ref.shape[1]} features, the job's FR model has {centres.shape[1]}")
    got = q.leakage(centres, ref, leak.threshold, TOP_K)
    summary = {"reference": leak.reference, "threshold": _r(leak.threshold), "identities": len(got.leaked),
               "max_cosine": _r(got.max_cosine.max())}
    detail = dict(summary, references=int(ref.shape[0]), leaked=got.leaked,
                  top_pairs=[{"identity": i, "reference_row": j, "cosine": _r(c)} for i, j, c in got.top_pairs])
    return summary, detail


def _model_summary(m: _Model, d: dict[str, Any]) -> dict[str, Any]:
    nn = d["nn_deg"]
    return {
        "name": m.name, "eer": _r(d["eer"]),
        "fnmr_at_fmr": {k: _r(v) for k, v in d["fnmr_at_fmr"].items()},
        "threshold_at_fmr": {k: _r(v) for k, v in d["threshold_at_fmr"].items()},
        "genuine_mean": _r(m.genuine.mean), "impostor_mean": _r(m.impostor.mean),
        "genuine_pairs": m.genuine.n, "impostor_pairs": m.impostor.n,
        "min_centre_angle_deg": _r(nn.min()) if nn is not None else None,
        "nn_centre_angle_deg_mean": _r(nn.mean()) if nn is not None else None,
        "close_identities": d["close"].identities, "label_flips": m.flips,
        "intra_class_cosine_mean": _r(m.intra[m.evaluated].double().mean()) if bool(m.evaluated.any()) else None,
        "eer_threshold": _r(d["eer_threshold"]),
        "sample": _sample(m),
        "confidence": d["confidence"],
        "close_threshold": _r(d["close_threshold"]), "close_threshold_rule": d["close_threshold_rule"],
    }


def _model_detail(m: _Model, d: dict[str, Any]) -> dict[str, Any]:
    nn, close = d["nn_deg"], d["close"]
    where = m.evaluated.nonzero(as_tuple=True)[0]  # [K]
    worst = where[torch.argsort(m.intra[where], stable=True)[:TOP_K]].tolist()
    detail: dict[str, Any] = {
        "name": m.name,
        "histograms": {"genuine": m.genuine.compact(), "impostor": m.impostor.compact()},
        "roc": None,
        "nn_centre_angle_deg": None if nn is None else {
            "mean": _r(nn.mean()), "std": _r(nn.std()) if nn.numel() > 1 else 0.0,
            **{f"p{p}": _r(v) for p, v in zip((0, 1, 5, 50, 95, 100),
                                               torch.quantile(nn, torch.tensor([0, .01, .05, .5, .95, 1.],
                                                                               dtype=torch.float64)))}},
        "close_pairs": {"threshold": _r(d["close_threshold"]), "rule": d["close_threshold_rule"],
                        "pairs": close.count, "identities": close.identities,
                        "top": [{"identity_a": i, "identity_b": j, "cosine": _r(c)} for i, j, c in close.pairs]},
        # None when the model embedded none of the identities (a preview's first identities may lie
        # outside the evaluator's sample, which is the full job's).
        "intra_class": {"mean": _r(m.intra[where].double().mean()) if where.numel() else None,
                        "min": _r(m.intra[where].min()) if where.numel() else None,
                        "worst": [{"identity": i, "cosine": _r(m.intra[i])} for i in worst]},
        "label_flips": {"count": m.flips, "first": m.flip_first, "worst": m.flip_worst},
    }
    if m.rates is not None:
        t, fmr, fnmr = q.roc_points(m.rates)
        detail["roc"] = {"threshold": [_r(v) for v in t], "fmr": [_r(v) for v in fmr],
                         "fnmr": [_r(v) for v in fnmr]}
    return detail


def _r(x: Any) -> Any:
    """A float (or 0-d tensor) rounded to 6 decimals; None stays None."""
    return None if x is None else round(float(x), 6)
