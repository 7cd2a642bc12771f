"""workers.report: a report from synthetic shard features with planted faults, checked against
direct computations over the whole (small) dataset held in memory."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from models import quality as q
from models.sampling.sphere import normalize
from models.seeding import make_generator
from workers import report as rp

N, A, E, D = 12, 6, 32, 16  # identities, images each, job and evaluator dims
SHARDS = [range(5), range(5, 9), range(9, 12)]
FLIP = (2, 0)  # (identity, sample) planted closer to identity 9's centre
LEAKED, REF_ROW = 7, 3  # identity 7 is reference row 3
TWINS = (4, 5)  # identity 5 is a near duplicate of identity 4


def make_features() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(job [N, A, E], evaluator [N, A, D], aligned [N, A], reference [M, E]) with the planted faults."""
    g = make_generator(11)
    ref_job = normalize(g.normal(N, E))  # [N, E]
    ref_job[TWINS[1]] = normalize(ref_job[TWINS[0]] + 0.05 * g.normal(E))
    ref_eval = normalize(g.normal(N, D))  # [N, D]
    ref_eval[TWINS[1]] = normalize(ref_eval[TWINS[0]] + 0.05 * g.normal(D))
    job = normalize(ref_job[:, None] + 0.12 * g.normal(N, A, E))  # [N, A, E]
    evaluator = normalize(ref_eval[:, None] + 0.2 * g.normal(N, A, D))  # [N, A, D]
    i, s = FLIP
    job[i, s] = normalize(ref_job[9] + 0.05 * g.normal(E))
    evaluator[i, s] = normalize(ref_eval[9] + 0.05 * g.normal(D))
    aligned = torch.ones(N, A, dtype=torch.bool)
    aligned[1, 2] = aligned[3, 0] = aligned[3, 1] = False
    reference = normalize(g.normal(20, E))  # [20, E] real people
    reference[REF_ROW] = normalize(ref_job[LEAKED] + 0.02 * g.normal(E))
    return job, evaluator, aligned, reference


def png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (112, 112), colour).save(buf, format="PNG")
    return buf.getvalue()


def make_inputs(evaluator: bool = True, cap: int = 20_000, seed: int = 3,
                calls: list[int] | None = None) -> rp.ReportInputs:
    job, ev, aligned, reference = make_features()

    def shards() -> Iterator[rp.ShardFeatures]:
        if calls is not None:
            calls.append(1)
        for r in SHARDS:
            ids = list(r)
            yield rp.ShardFeatures(ids, job[r.start:r.stop], ev[r.start:r.stop] if evaluator else None,
                                   aligned[r.start:r.stop])

    return rp.ReportInputs(
        job_id="job<1>", embedder="iresnet-tiny", evaluator="sface-2021dec-int8bq" if evaluator else None,
        evaluator_threshold=0.5 if evaluator else None, identities=N, images_per_identity=A, seed=seed,
        shards=shards, thumbnails=[(0, [png((200, 0, 0)), png((0, 200, 0))]), (4, [png((0, 0, 200))])],
        counts={"requested": N * A, "rendered": N * A, "alignment_failures": 3, "filtered": 0, "topped_up": 0},
        leakage=rp.Leakage("celebs-<x>", reference, 0.8), impostor_images=cap)


@pytest.fixture(scope="module")
def built() -> tuple[rp.Report, list[int]]:
    calls: list[int] = []
    return rp.build_report(make_inputs(calls=calls)), calls


def direct(x: torch.Tensor, close_threshold: float) -> dict[str, Any]:
    """Every figure of one model's summary, from the whole feature tensor [N, A, F] at once."""
    flat = x.reshape(N * A, -1)  # [N*A, F]
    labels = torch.arange(N).repeat_interleave(A)
    gram = flat @ flat.T
    upper = torch.ones_like(gram, dtype=torch.bool).triu(diagonal=1)
    same = labels[:, None] == labels[None, :]
    gen, imp = gram[upper & same].double(), gram[upper & ~same].double()
    c = normalize(x.mean(dim=1))  # [N, F]
    cc = (c @ c.T).double().fill_diagonal_(-2)
    nn_deg = torch.rad2deg(torch.acos(cc.max(dim=1).values.clamp(-1, 1)))
    to_centres = flat @ c.T  # [N*A, F]
    own = to_centres[torch.arange(N * A), labels].clone()
    to_centres[torch.arange(N * A), labels] = -2
    close = (cc >= close_threshold).any(dim=1)
    h_gen, h_imp = q.ScoreHistogram(), q.ScoreHistogram()
    h_gen.add(gen)
    h_imp.add(imp)
    return {"genuine_mean": float(gen.mean()), "impostor_mean": float(imp.mean()),
            "genuine_pairs": gen.numel(), "impostor_pairs": imp.numel(),
            "eer": q.equal_error_rate(q.error_rates(h_gen, h_imp))[0],
            "fnmr_1e-3": q.fnmr_at_fmr(q.error_rates(h_gen, h_imp), 1e-3),
            "min_centre_angle_deg": float(nn_deg.min()), "nn_centre_angle_deg_mean": float(nn_deg.mean()),
            "label_flips": int((to_centres.max(dim=1).values > own).sum()),
            "close_identities": int(close.sum()),
            "intra_class_cosine_mean": float((x * c[:, None]).sum(-1).mean())}


def test_summary_shape(built: tuple[rp.Report, list[int]]) -> None:
    s = built[0].summary
    assert {"images", "identities", "models", "alignment_failures", "counts", "leakage"} <= set(s)
    keys = {"name", "eer", "fnmr_at_fmr", "threshold_at_fmr", "genuine_mean", "impostor_mean", "genuine_pairs",
            "impostor_pairs", "min_centre_angle_deg", "nn_centre_angle_deg_mean", "close_identities",
            "label_flips", "intra_class_cosine_mean"}
    for m in ("job", "evaluator"):
        assert keys <= set(s["models"][m])
        assert set(s["models"][m]["fnmr_at_fmr"]) == set(s["models"][m]["threshold_at_fmr"]) == {"1e-3", "1e-4"}
    assert (s["images"], s["identities"], s["alignment_failures"]) == (N * A, N, 3)
    assert s["counts"]["rendered"] == N * A
    assert set(s["leakage"]) == {"reference", "threshold", "identities", "max_cosine"}
    json.dumps(s)  # plain JSON


@pytest.mark.parametrize("model", ["job", "evaluator"])
def test_summary_matches_direct_computation(built: tuple[rp.Report, list[int]], model: str) -> None:
    job, ev, _, _ = make_features()
    s = built[0].summary["models"][model]
    want = direct(job if model == "job" else ev, s["close_threshold"])
    for key in ("genuine_pairs", "impostor_pairs", "label_flips", "close_identities"):
        assert s[key] == want[key], key
    for key in ("genuine_mean", "impostor_mean", "eer", "intra_class_cosine_mean",
                "min_centre_angle_deg", "nn_centre_angle_deg_mean"):
        assert s[key] == pytest.approx(want[key], abs=2e-4), key
    assert s["genuine_pairs"] == N * A * (A - 1) // 2 and s["impostor_pairs"] == (N * A) ** 2 // 2 - N * A * A // 2
    assert s["label_flips"] >= 1  # the planted flip
    assert s["close_identities"] >= 2  # the planted twins
    # 2376 impostor pairs: enough for FMR 1e-3, too few for 1e-4, which gets no made-up figure
    fnmr, threshold = want["fnmr_1e-3"]
    assert s["fnmr_at_fmr"] == {"1e-3": pytest.approx(fnmr, abs=1e-6), "1e-4": None}
    assert s["threshold_at_fmr"] == {"1e-3": pytest.approx(threshold, abs=1e-6), "1e-4": None}
    if model == "job":
        assert s["close_threshold"] == s["threshold_at_fmr"]["1e-3"]


def test_planted_faults_are_listed(built: tuple[rp.Report, list[int]]) -> None:
    report, calls = built
    d = report.data
    assert len(calls) == 2  # two passes over the shards
    job = d["models"]["job"]
    assert job["close_pairs"]["top"][0]["identity_a"] == TWINS[0] and job["close_pairs"]["top"][0]["identity_b"] == TWINS[1]
    assert d["models"]["evaluator"]["close_pairs"]["rule"] == "published same-person threshold"
    assert report.summary["models"]["evaluator"]["close_threshold"] == 0.5
    flip = job["label_flips"]["worst"][0]
    assert (flip["identity"], flip["sample"], flip["other_identity"]) == (*FLIP, 9)
    assert flip["other_cosine"] > flip["own_cosine"]
    assert job["intra_class"]["worst"][0]["identity"] == FLIP[0]  # the flipped image drags identity 2 down
    leak = report.summary["leakage"]
    assert (leak["identities"], leak["threshold"], leak["reference"]) == (1, 0.8, "celebs-<x>")
    assert d["leakage"]["top_pairs"][0]["identity"] == LEAKED and d["leakage"]["top_pairs"][0]["reference_row"] == REF_ROW
    # the centre of 6 images at noise 0.12 in 32-d sits about 0.96 from its reference (0.94 with seed 11)
    assert leak["max_cosine"] == d["leakage"]["top_pairs"][0]["cosine"] > 0.9
    assert {w["identity"]: w["failures"] for w in d["alignment"]["worst_identities"]} == {3: 2, 1: 1}
    hist = job["histograms"]["genuine"]
    assert sum(hist["counts"]) == hist["n"] == report.summary["models"]["job"]["genuine_pairs"]
    assert job["roc"]["fmr"][0] == 1.0 and job["roc"]["fnmr"][-1] == 1.0
    assert d["impostor_subset"]["images"] == N * A
    assert json.loads(report.files["report.json"]) == json.loads(json.dumps(d))


def test_plots_decode_with_sensible_sizes(built: tuple[rp.Report, list[int]]) -> None:
    files = built[0].files
    for name in ("scores_job", "scores_evaluator", "roc", "det"):
        img = Image.open(io.BytesIO(files[f"plots/{name}.png"]))
        assert img.format == "PNG" and img.size == (600, 400), name
        assert len(np.unique(np.asarray(img.convert("L")))) > 10, name  # something was drawn
    sheet = Image.open(io.BytesIO(files["plots/contact_sheet.png"])).convert("RGB")
    assert sheet.size == (rp.LABEL_W + 2 * rp.THUMB, 2 * rp.THUMB)
    assert sheet.getpixel((rp.LABEL_W + rp.THUMB + 5, 5)) == (0, 200, 0)  # identity 0's second image
    assert sheet.getpixel((rp.LABEL_W + 5, rp.THUMB + 5)) == (0, 0, 200)  # identity 4's first


def test_html_is_self_contained_and_escaped(built: tuple[rp.Report, list[int]]) -> None:
    report = built[0]
    page = report.files["report.html"].decode()
    assert page.count("data:image/png;base64,") == 5
    assert "job&lt;1&gt;" in page and "job<1>" not in page
    assert "celebs-&lt;x&gt;" in page
    assert "src=\"http" not in page and "href=" not in page
    for m in ("job", "evaluator"):
        s = report.summary["models"][m]
        for v in (s["eer"], s["genuine_mean"], s["min_centre_angle_deg"], s["label_flips"], s["name"]):
            assert f"<td>{rp.fmt(v)}</td>" in page


def test_reports_are_deterministic_and_the_subset_follows_the_seed() -> None:
    a = rp.build_report(make_inputs(cap=30))
    b = rp.build_report(make_inputs(cap=30))
    c = rp.build_report(make_inputs(cap=30, seed=4))
    assert a.files == b.files
    assert a.data["impostor_subset"]["images"] == 30 and a.data["impostor_subset"]["identities"] == N
    quota = rp.impostor_quota(N, A, 30, 3)
    assert quota.sum() == 30 and set(quota.tolist()) == {2, 3}  # spread: 30 = 12 x 2 + 6
    want_pairs = (30 * 30 - int((quota * quota).sum())) // 2
    assert a.summary["models"]["job"]["impostor_pairs"] == want_pairs
    assert a.summary["models"]["job"]["impostor_mean"] != c.summary["models"]["job"]["impostor_mean"]
    assert a.summary["models"]["job"]["genuine_pairs"] == N * A * (A - 1) // 2  # genuine: always all


def test_without_evaluator() -> None:
    report = rp.build_report(make_inputs(evaluator=False))
    assert report.summary["models"]["evaluator"] is None and report.data["models"]["evaluator"] is None
    assert "plots/scores_evaluator.png" not in report.files and "plots/roc.png" in report.files
    assert report.summary["models"]["job"]["label_flips"] >= 1
    assert report.files["report.html"].decode().count("data:image/png;base64,") == 4


def test_bad_shards_are_refused() -> None:
    inputs = make_inputs()
    full = inputs.shards

    def missing() -> Iterator[rp.ShardFeatures]:
        yield from list(full())[:2]

    inputs.shards = missing
    with pytest.raises(ValueError, match="cover 9 of 12 identities"):
        rp.build_report(inputs)
    inputs = make_inputs(evaluator=False)
    inputs.evaluator = "sface"
    with pytest.raises(ValueError, match="evaluator features"):
        rp.build_report(inputs)
    inputs = make_inputs()
    inputs.identities = 11
    with pytest.raises(ValueError, match="outside"):
        rp.build_report(inputs)


def test_single_identity_has_no_impostors() -> None:
    job, ev, aligned, _ = make_features()
    inputs = make_inputs()
    inputs.identities, inputs.leakage = 1, None
    inputs.shards = lambda: iter([rp.ShardFeatures([0], job[:1], ev[:1], aligned[:1])])
    s = rp.build_report(inputs).summary["models"]["job"]
    assert s["impostor_pairs"] == 0 and s["eer"] is None and s["impostor_mean"] is None
    assert s["min_centre_angle_deg"] is None and s["label_flips"] == 0 and s["close_identities"] == 0
    assert not math.isnan(s["genuine_mean"])


SAMPLED = [2, 4, 5, 9, 11]  # the evaluator's sample: the flipped image's identity and its target, the twins


def sampled_inputs(sampled: list[int] = SAMPLED) -> rp.ReportInputs:
    """make_inputs() with the evaluator rows of the identities outside `sampled` NaN, as a shard writes them."""
    inputs = make_inputs()
    full = inputs.shards
    keep = torch.zeros(N, dtype=torch.bool)
    keep[sampled] = True

    def shards() -> Iterator[rp.ShardFeatures]:
        for sh in full():
            ev = sh.evaluator.clone()
            ev[~keep[sh.identities]] = float("nan")
            yield rp.ShardFeatures(sh.identities, sh.job, ev, sh.aligned, sh.samples)

    inputs.shards = shards
    return inputs


def test_a_sampled_evaluator_reports_the_sample_and_its_figures() -> None:
    report = rp.build_report(sampled_inputs())
    full = rp.build_report(make_inputs())
    _, ev, _, _ = make_features()
    s, k = report.summary["models"]["evaluator"], len(SAMPLED)
    x = ev[SAMPLED]  # [k, A, D]
    flat, labels = x.reshape(k * A, -1), torch.arange(k).repeat_interleave(A)
    gram, upper = flat @ flat.T, torch.ones(k * A, k * A, dtype=torch.bool).triu(diagonal=1)
    same = labels[:, None] == labels[None, :]
    gen, imp = gram[upper & same].double(), gram[upper & ~same].double()
    h_gen, h_imp = q.ScoreHistogram(), q.ScoreHistogram()
    h_gen.add(gen)
    h_imp.add(imp)
    assert s["genuine_pairs"] == k * A * (A - 1) // 2 and s["impostor_pairs"] == imp.numel()
    assert s["genuine_mean"] == pytest.approx(float(gen.mean()), abs=2e-4)
    assert s["impostor_mean"] == pytest.approx(float(imp.mean()), abs=2e-4)
    assert s["eer"] == pytest.approx(q.equal_error_rate(q.error_rates(h_gen, h_imp))[0], abs=1e-6)
    c = normalize(x.mean(dim=1))  # [k, D]
    assert s["intra_class_cosine_mean"] == pytest.approx(float((x * c[:, None]).sum(-1).mean()), abs=2e-4)
    assert s["label_flips"] >= 1  # the planted flip (2, 0) toward 9: both sampled
    flips = report.data["models"]["evaluator"]["label_flips"]["worst"]
    assert (flips[0]["identity"], flips[0]["sample"], flips[0]["other_identity"]) == (*FLIP, 9)
    top = report.data["models"]["evaluator"]["close_pairs"]["top"]
    assert (top[0]["identity_a"], top[0]["identity_b"]) == TWINS  # global identity numbers
    assert {w["identity"] for w in report.data["models"]["evaluator"]["intra_class"]["worst"]} <= set(SAMPLED)
    # the sample and its confidence, in the summary, report.json and report.html
    assert s["sample"] == {"identities": k, "images": k * A, "of_identities": N, "of_images": N * A, "all": False}
    assert full.summary["models"]["evaluator"]["sample"]["all"] is True
    sample = report.data["evaluator_sample"]
    assert sample["images"] == k * A and sample["impostor_images"] == "sample" and "report.evaluator" in sample["rule"]
    conf = s["confidence"]
    p, n_g, n_i = s["eer"], s["genuine_pairs"], s["impostor_pairs"]
    want = math.hypot(1.959964 * math.sqrt(p * (1 - p) / n_g), 1.959964 * math.sqrt(p * (1 - p) / n_i)) / 2
    assert conf["eer_half_width"] == pytest.approx(want, abs=1e-6)
    assert conf["impostor_pairs_above_threshold"] == {"1e-3": round(n_i * 1e-3, 1), "1e-4": round(n_i * 1e-4, 1)}
    assert conf["supported"] == {"1e-3": False, "1e-4": False}  # 360 impostor pairs support neither
    assert json.loads(report.files["report.json"])["summary"]["models"]["evaluator"]["confidence"] == conf
    page = report.files["report.html"].decode()
    assert f"Evaluator sample: {k} of {N} identities, {k * A} of {N * A} images" in page
    assert "EER 95% half-width" in page
    # the job model's figures do not depend on the evaluator's sample
    assert report.summary["models"]["job"] == full.summary["models"]["job"]


def test_a_partly_embedded_identity_is_refused() -> None:
    inputs = make_inputs()
    full = inputs.shards

    def shards() -> Iterator[rp.ShardFeatures]:
        for sh in full():
            ev = sh.evaluator.clone()
            ev[0, 1] = float("nan")
            yield rp.ShardFeatures(sh.identities, sh.job, ev, sh.aligned, sh.samples)

    inputs.shards = shards
    with pytest.raises(ValueError, match="in part"):
        rp.build_report(inputs)


def test_confidence_half_widths() -> None:
    # 1,000 images as 20 identities x 50: 24,500 genuine and 475,000 impostor pairs
    c = rp.confidence(24_500, 475_000, 0.05, {"1e-3": 0.2, "1e-4": 0.4})
    assert c["eer_half_width"] == pytest.approx(0.001399, abs=1e-6)  # (2.73e-3 (+) 6.2e-4) / 2
    assert c["fnmr_half_width"]["1e-3"] == pytest.approx(1.959964 * math.sqrt(0.2 * 0.8 / 24_500), abs=1e-6)
    assert c["impostor_pairs_above_threshold"] == {"1e-3": 475.0, "1e-4": 47.5}
    assert c["fmr_relative_half_width"]["1e-4"] == pytest.approx(1.959964 / math.sqrt(47.5), abs=1e-6)
    assert c["supported"] == {"1e-3": True, "1e-4": False}
    none = rp.confidence(0, 0, None, {"1e-3": None, "1e-4": None})
    assert none["eer_half_width"] is None and none["fnmr_half_width"] == {"1e-3": None, "1e-4": None}
