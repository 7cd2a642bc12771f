import math

import pytest
import torch

from models.seeding import DERIVE_SEED_SCHEME, derive_seed, make_generator, seeded_construction


def test_derive_seed_is_pinned_sha256():
    # sha256 of the JSON list '[7,"identity",0]', first 8 bytes big-endian, shifted to 63 bits
    assert derive_seed(7, "identity", 0) == 7665334890336327403
    assert derive_seed(7, "sample", 3, 5) == 8272019248498476894


def test_derive_seed_scheme_describes_the_function():
    import hashlib
    import json

    scheme = DERIVE_SEED_SCHEME.split(" = ", 1)[1]
    namespace = {"sha256": hashlib.sha256, "json": json, "parts": (7, "sample", 3, 5)}
    assert eval(scheme, namespace) == derive_seed(7, "sample", 3, 5)


def test_derive_seed_range_and_separation():
    seeds = {derive_seed(7, "sample", i, s) for i in range(20) for s in range(20)}
    assert len(seeds) == 400
    assert all(0 <= x < 2**63 for x in seeds)
    assert derive_seed(1, "a") != derive_seed("1", "a")  # int and str parts are told apart
    assert derive_seed(1, 23) != derive_seed(12, 3)  # no ambiguity from concatenation
    assert derive_seed(7, "identity", 1) != derive_seed(7, "variation", 1)


@pytest.mark.parametrize("parts", [(), (1.5,), (True,), (None,)])
def test_derive_seed_rejects_bad_parts(parts):
    with pytest.raises(ValueError, match="parts"):
        derive_seed(*parts)


def test_make_generator_reproducible_and_leaves_global_rng_alone():
    before = torch.random.get_rng_state()
    a = make_generator(3).normal(5)
    b = make_generator(3).normal(5)
    c = make_generator(4).normal(5)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(before, torch.random.get_rng_state())
    with pytest.raises(ValueError, match="seed"):
        make_generator(-1)


def test_seeded_construction_restores_global_rng():
    before = torch.random.get_rng_state()
    with seeded_construction(5):
        a = torch.nn.Linear(4, 4).weight.detach().clone()
    with seeded_construction(5):
        b = torch.nn.Linear(4, 4).weight.detach().clone()
    assert torch.equal(a, b)
    assert torch.equal(before, torch.random.get_rng_state())


def test_stream_words_are_philox_keyed_by_the_seed():
    # STREAM_SCHEME's first clause: word k of stream(seed) is numpy's Philox4x64-10 output with key (seed, 0)
    import numpy as np

    from models.seeding import STREAM_SCHEME

    assert "Philox4x64-10" in STREAM_SCHEME and "key (seed, 0)" in STREAM_SCHEME
    words = make_generator(2**63 + 5).words(9)
    assert words.dtype == np.uint64
    assert np.array_equal(words, np.random.Philox(key=np.array([2**63 + 5, 0], dtype=np.uint64)).random_raw(9))


def test_stream_uniform_is_exact_from_the_words():
    import numpy as np

    words = make_generator(11).words(1000)
    u32 = make_generator(11).uniform(1000)
    assert u32.dtype == torch.float32
    assert torch.equal(u32.double(), torch.from_numpy((words >> np.uint64(40)).astype(np.float64)) / 2**24)
    u64 = make_generator(11).uniform(1000, dtype=torch.float64)
    assert torch.equal(u64, torch.from_numpy((words >> np.uint64(11)).astype(np.float64)) / 2**53)
    assert float(u32.min()) >= 0 and float(u32.max()) < 1


def test_stream_log_is_accurate():
    import numpy as np

    from models.seeding import _log

    x = np.concatenate([np.linspace(1e-300, 1e-290, 50), np.linspace(1e-9, 1.0, 100_000), [0.5, 2.0, 1e300]])
    exact = np.array([math.log(v) for v in x])
    rel = np.abs(_log(x) - exact) / np.maximum(np.abs(exact), 1e-300)
    assert float(rel[exact != 0].max()) < 1e-15
    assert _log(np.array([1.0]))[0] == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stream_normal_moments(seed):
    z = make_generator(seed).normal(200_000, dtype=torch.float64)
    # mean, variance, skew, kurtosis of 2e5 standard normals: standard errors 0.0022, 0.0032, 0.0055, 0.011
    assert abs(float(z.mean())) < 0.012
    assert abs(float(z.var()) - 1) < 0.016
    assert abs(float((z**3).mean())) < 0.03
    assert abs(float((z**4).mean()) - 3) < 0.06
    # tails: P(|z| > 3) = 0.0026998
    assert abs(float((z.abs() > 3).double().mean()) - 0.0026998) < 0.0006


def test_stream_is_reproducible_shapes_and_devices_and_leaves_global_rng_alone():
    before = torch.random.get_rng_state()
    g = make_generator(5)
    assert g.normal(2, 3).shape == (2, 3) and g.normal((4, 1)).shape == (4, 1)
    assert g.normal(0).shape == (0,)
    assert torch.equal(make_generator(5).normal(7), make_generator(5).normal(7))
    assert torch.equal(make_generator(5).normal(3, 3).reshape(-1), make_generator(5).normal(9))
    # a draw of float64 rounded to float32 is the float32 draw
    assert torch.equal(make_generator(5).normal(9, dtype=torch.float64).float(), make_generator(5).normal(9))
    assert torch.equal(before, torch.random.get_rng_state())
    with pytest.raises(ValueError, match="size"):
        g.normal(-1)


def test_stream_integers_and_permutation():
    ints = make_generator(3).integers(10, 10_000)
    assert ints.dtype == torch.int64 and int(ints.min()) == 0 and int(ints.max()) == 9
    counts = torch.bincount(ints, minlength=10)
    assert int(counts.min()) > 900 and int(counts.max()) < 1100
    perm = make_generator(3).permutation(500)
    assert sorted(perm.tolist()) == list(range(500)) and perm.tolist() != list(range(500))
    assert torch.equal(perm, make_generator(3).permutation(500))
    with pytest.raises(ValueError, match="high"):
        make_generator(3).integers(0, 5)


def test_stream_state_round_trip_adopts_the_saved_seed():
    a = make_generator(9)
    a.normal(3)
    saved = a.get_state()
    expected = a.normal(5)
    b = make_generator(0)  # like a torch.Generator, the state carries the seed
    b.set_state(saved)
    assert torch.equal(b.normal(5), expected)
    assert b.seed == 9


def test_normalize_exact_is_unit_and_matches_the_float64_norm():
    from models.seeding import normalize_exact

    x = make_generator(4).normal(50, 512)
    y = normalize_exact(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    ref = (x.double() / x.double().norm(dim=1, keepdim=True)).float()
    assert float((y - ref).abs().max()) <= 2**-24  # float64 sums in another order: at most a last-bit flip
    assert torch.allclose(y.double().norm(dim=1), torch.ones(50, dtype=torch.float64), atol=1e-6)
