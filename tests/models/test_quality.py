"""models.quality: inputs whose answers are known by construction, and tiled == direct."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models import quality as q
from models.sampling.sphere import normalize
from models.seeding import make_generator

W = 2 / q.DEFAULT_BINS  # bin width


def centre_of_bin(k: int) -> float:
    return -1 + (k + 0.5) * W


def hist(scores: np.ndarray | list[float]) -> q.ScoreHistogram:
    h = q.ScoreHistogram()
    h.add(torch.as_tensor(np.asarray(scores, dtype=np.float64)))
    return h


def unit(angle_deg: float, d: int = 8, plane: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """A unit vector at `angle_deg` from axis plane[0] towards axis plane[1]."""
    v = torch.zeros(d)
    a = math.radians(angle_deg)
    v[plane[0]], v[plane[1]] = math.cos(a), math.sin(a)
    return v


# ---- histograms and error rates --------------------------------------------------------------


def test_histogram_bins_and_exact_mean() -> None:
    h = hist([-1.0, centre_of_bin(0), centre_of_bin(1234), 1.0, 1.0 + 1e-7, 0.25])
    assert h.n == 6
    assert h.counts[0] == 2 and h.counts[1234] == 1 and h.counts[-1] == 2  # -1 -> bin 0, 1 -> last bin
    assert h.counts[int((0.25 + 1) / W)] == 1
    assert h.mean == pytest.approx((-1 + centre_of_bin(0) + centre_of_bin(1234) + 2 + 1e-7 + 0.25) / 6, abs=1e-12)
    c = h.compact()
    assert c["start"] == 0 and len(c["counts"]) == q.DEFAULT_BINS and sum(c["counts"]) == 6
    with pytest.raises(ValueError, match="NaN"):
        h.add(torch.tensor([0.1, float("nan")]))


def test_rates_at_edges_are_exact_counts() -> None:
    rng = np.random.default_rng(0)
    gen, imp = rng.normal(0.5, 0.15, 3000), rng.normal(0.0, 0.15, 5000)
    rates = q.error_rates(hist(gen), hist(imp))
    edges = rates.thresholds
    for k in (0, 300, 900, 1000, 1333, 1500, 1999, 2000):
        assert rates.fmr[k] == pytest.approx(np.mean(imp >= edges[k]) if k < q.DEFAULT_BINS else 0.0, abs=1e-12)
        assert rates.fnmr[k] == pytest.approx(np.mean(gen < edges[k]) if k < q.DEFAULT_BINS else 1.0, abs=1e-12)
    assert np.all(np.diff(rates.fmr) <= 0) and np.all(np.diff(rates.fnmr) >= 0)


def test_eer_of_overlapping_uniform_sets_is_known() -> None:
    # genuine uniform on [0, 1): FNMR(t) = t; impostor uniform on [-0.5, 0.5): FMR(t) = 0.5 - t.
    # They cross at t = 0.25 with EER 0.25.
    gen = (np.arange(10_000) + 0.5) / 10_000
    imp = -0.5 + (np.arange(10_000) + 0.5) / 10_000
    eer, t = q.equal_error_rate(q.error_rates(hist(gen), hist(imp)))
    assert eer == pytest.approx(0.25, abs=1e-3)
    assert t == pytest.approx(0.25, abs=W)


def empirical_eer(gen: np.ndarray, imp: np.ndarray) -> float:
    """EER by sorting: over every score as a threshold, (FMR + FNMR)/2 where |FMR - FNMR| is smallest."""
    t = np.sort(np.concatenate([gen, imp]))
    fnmr = np.searchsorted(np.sort(gen), t, side="left") / gen.size  # share of genuine < t
    fmr = 1 - np.searchsorted(np.sort(imp), t, side="left") / imp.size  # share of impostor >= t
    k = int(np.argmin(np.abs(fmr - fnmr)))
    return float((fmr[k] + fnmr[k]) / 2)


def test_eer_of_gaussians_matches_sorting_and_theory() -> None:
    rng = np.random.default_rng(1)
    gen, imp = rng.normal(0.5, 0.1, 20_000), rng.normal(0.1, 0.1, 20_000)
    eer, t = q.equal_error_rate(q.error_rates(hist(gen), hist(imp)))
    assert eer == pytest.approx(empirical_eer(gen, imp), abs=1e-3)  # one bin holds ~0.05% of each set
    assert eer == pytest.approx(0.02275, abs=0.003)  # Phi(-2): the means are 4 sigma apart
    assert t == pytest.approx(0.3, abs=0.01)


def test_separated_sets_have_zero_error() -> None:
    gen, imp = np.linspace(0.6, 0.9, 2000), np.linspace(-0.2, 0.2, 20_000)
    rates = q.error_rates(hist(gen), hist(imp))
    eer, t = q.equal_error_rate(rates)
    assert eer == 0.0 and 0.2 <= t <= 0.6 + W
    fnmr, thr = q.fnmr_at_fmr(rates, 1e-4)  # type: ignore[misc]
    assert fnmr == 0.0 and 0.2 - 1e-9 < thr <= 0.6  # the first edge above every impostor


def test_fnmr_at_fmr_constructed() -> None:
    lo, hi = 500, 1300  # bins holding the bulk of the impostors and its top 10 (10 / 10000 = 1e-3)
    imp = [centre_of_bin(lo)] * 9990 + [centre_of_bin(hi)] * 10
    gen = [centre_of_bin(1100)] * 50 + [centre_of_bin(1900)] * 50
    rates = q.error_rates(hist(gen), hist(imp))
    fnmr, t = q.fnmr_at_fmr(rates, 1e-3)  # type: ignore[misc]
    assert t == pytest.approx(-1 + (lo + 1) * W) and fnmr == 0.0  # just above the bulk
    fnmr, t = q.fnmr_at_fmr(rates, 1e-4)  # type: ignore[misc]
    assert t == pytest.approx(-1 + (hi + 1) * W) and fnmr == 0.5  # above the top 10: half the genuine lost
    few = q.error_rates(hist(gen), hist(imp[:999]))
    assert q.fnmr_at_fmr(few, 1e-3) is None  # fewer than 1000 impostor pairs cannot show FMR 1e-3
    assert q.fnmr_at_fmr(q.error_rates(hist(gen), hist(imp[:1000])), 1e-3) is not None
    with pytest.raises(ValueError, match="fmr"):
        q.fnmr_at_fmr(rates, 0.0)


def test_roc_points_span_both_ends_and_are_monotone() -> None:
    rng = np.random.default_rng(2)
    rates = q.error_rates(hist(rng.normal(0.5, 0.1, 500)), hist(rng.normal(0.0, 0.1, 500)))
    t, fmr, fnmr = q.roc_points(rates)
    assert (fmr[0], fnmr[0], t[0]) == (1.0, 0.0, -1.0) and (fmr[-1], fnmr[-1], t[-1]) == (0.0, 1.0, 1.0)
    assert np.all(np.diff(fmr) <= 0) and np.all(np.diff(fnmr) >= 0) and np.all(np.diff(t) > 0)
    assert t.size < 600  # only the edges where a rate changes, not all 2001


# ---- genuine and impostor scores -----------------------------------------------------------


def test_genuine_scores_are_all_within_pairs() -> None:
    x = normalize(make_generator(0).normal(3, 5, 16))  # [3, 5, 16]
    got = q.genuine_scores(x)  # [3, 10]
    want = torch.tensor([[float(x[n, s] @ x[n, t]) for s in range(5) for t in range(s + 1, 5)] for n in range(3)])
    assert got.shape == (3, 10)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("tile", [1, 7, 64])
def test_impostor_scores_tiled_equal_direct(tile: int) -> None:
    g = make_generator(1)
    x = normalize(g.normal(40, 8))  # [40, 8]
    labels = g.integers(6, (40,))  # [40]
    got = torch.sort(torch.cat(list(q.impostor_scores(x, labels, tile)))).values
    gram = x @ x.T  # [40, 40] fine for a test
    mask = (labels[:, None] != labels[None, :]).triu(diagonal=1)
    want = torch.sort(gram[mask]).values
    torch.testing.assert_close(got, want)
    assert got.numel() == q.impostor_pair_count(labels)


# ---- centres and separability --------------------------------------------------------------


def test_centres_and_intra_class_at_known_angles() -> None:
    # identity 0: images at +-20 deg around axis 0; identity 1: at 90 +- 30 deg, i.e. around axis 1
    x = torch.stack([torch.stack([unit(20), unit(-20)]), torch.stack([unit(60), unit(120)])])  # [2, 2, 8]
    c = q.centres(x)  # [2, 8]
    torch.testing.assert_close(c, torch.stack([unit(0), unit(90)]), atol=1e-6, rtol=0)
    torch.testing.assert_close(q.intra_class_cosine(x, c),
                               torch.tensor([math.cos(math.radians(20)), math.cos(math.radians(30))]))


def test_separability_of_points_at_known_angles() -> None:
    c = torch.stack([unit(0), unit(10), unit(35), unit(90), unit(90, plane=(0, 2))])  # the last: axis 2
    sep = q.separability(c, tile=2)
    want = [10, 10, 25, 55, 90]  # the last is orthogonal to all others
    torch.testing.assert_close(torch.rad2deg(sep.nn_angle), torch.tensor(want, dtype=torch.float32), atol=1e-3,
                               rtol=0)
    assert math.degrees(sep.min_angle) == pytest.approx(10, abs=1e-3)
    assert sep.nn_index[:4].tolist() == [1, 0, 1, 2]


@pytest.mark.parametrize("tile", [3, 1000])
def test_close_pairs_count_top_and_identities(tile: int) -> None:
    g = make_generator(3)
    c = normalize(g.normal(30, 64))  # nearly orthogonal
    c[7] = normalize(c[3] + 0.05 * g.normal(64))  # planted near duplicates
    c[21] = normalize(c[3] + 0.06 * g.normal(64))
    c[12] = normalize(c[25] + 0.05 * g.normal(64))
    gram = (c @ c.T).triu(diagonal=1)
    got = q.close_pairs(c, 0.8, top_k=2, tile=tile)
    hits = (gram >= 0.8).nonzero().tolist()
    assert got.count == len(hits) == 4  # (3,7), (3,21), (7,21), (12,25)
    assert got.identities == 5
    want = sorted(((float(gram[i, j]), i, j) for i, j in hits), reverse=True)[:2]
    assert [(i, j) for i, j, _ in got.pairs] == [(i, j) for _, i, j in want]
    assert got.pairs[0][2] == pytest.approx(want[0][0])


# ---- label flips and leakage ---------------------------------------------------------------


@pytest.mark.parametrize("tile", [2, 1000])
def test_label_flips_constructed(tile: int) -> None:
    c = torch.stack([unit(0), unit(60), unit(120)])  # [3, 8] centres
    x = torch.stack([unit(5), unit(-5), unit(50), unit(35), unit(85), unit(125)])  # [6, 8]
    own = torch.tensor([0, 0, 0, 1, 2, 2])  # image 2 (50 deg) sits nearer centre 1 (60), so does image 4 (85)
    f = q.label_flips(x, own, c, tile=tile)
    assert f.flipped.tolist() == [False, False, True, False, True, False]
    assert f.count == 2
    assert f.other_index[2] == 1 and f.other_index[4] == 1
    torch.testing.assert_close(f.own[2], torch.tensor(math.cos(math.radians(50))))
    torch.testing.assert_close(f.other[2], torch.tensor(math.cos(math.radians(10))))
    assert f.first(1) == [2]
    assert f.worst(5) == [2, 4]  # margins: cos 10 - cos 50 = 0.342 > cos 25 - cos 35 = 0.087


def test_label_flips_tiled_equal_direct() -> None:
    g = make_generator(4)
    c = normalize(g.normal(17, 6))
    own = g.integers(17, (50,))
    x = normalize(c[own] + 0.9 * g.normal(50, 6))
    got = q.label_flips(x, own, c, tile=4)
    sims = x @ c.T  # [50, 17]
    own_cos = sims[torch.arange(50), own]
    sims[torch.arange(50), own] = -math.inf
    other, index = sims.max(dim=1)
    torch.testing.assert_close(got.other, other)
    assert torch.equal(got.other_index, index)
    assert torch.equal(got.flipped, other > own_cos) and got.count > 0


def test_leakage_finds_the_planted_identity() -> None:
    g = make_generator(5)
    c = normalize(g.normal(25, 64))  # [25, 64]
    ref = normalize(g.normal(40, 64))  # [40, 64]
    ref[13] = normalize(c[9] + 0.1 * g.normal(64))  # identity 9 is a real person
    got = q.leakage(c, ref, threshold=0.6, top_k=3, tile=4)
    assert got.leaked == [9]
    assert got.top_pairs[0][:2] == (9, 13) and got.top_pairs[0][2] > 0.7
    sims = c @ ref.T
    torch.testing.assert_close(got.max_cosine, sims.max(dim=1).values)
    assert torch.equal(got.nearest, sims.argmax(dim=1))
    assert [p[2] for p in got.top_pairs] == pytest.approx(sorted(sims.max(dim=1).values.tolist(), reverse=True)[:3])
    with pytest.raises(ValueError, match="reference"):
        q.leakage(c, ref[:, :32], 0.5)


def test_check_unit_refuses_bad_rows() -> None:
    q.check_unit(normalize(torch.randn(4, 8)), "x", 8)
    with pytest.raises(ValueError, match="unit-norm"):
        q.check_unit(torch.ones(4, 8), "x")
    with pytest.raises(ValueError, match="features"):
        q.check_unit(normalize(torch.randn(4, 8)), "x", 16)
    with pytest.raises(ValueError, match="NaN"):
        q.check_unit(torch.full((2, 2), float("nan")), "x")
