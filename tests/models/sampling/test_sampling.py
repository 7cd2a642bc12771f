import pytest
import torch

from models.sampling.embedding_noise import EmbeddingNoiseConfig, embedding_noise, mean_cosine
from models.sampling.random import sample_identities
from models.sampling.sphere import normalize, uniform_sphere
from models.seeding import make_generator


def test_normalize_unit_rows_and_zero_stays_zero():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert torch.allclose(normalize(x), torch.tensor([[0.6, 0.8], [0.0, 0.0]]))


def test_uniform_sphere_unit_rows_and_roughly_centred():
    x = uniform_sphere(2000, 16, make_generator(0))
    assert x.shape == (2000, 16) and x.dtype == torch.float32
    assert torch.allclose(x.norm(dim=1), torch.ones(2000), atol=1e-5)
    assert x.mean(dim=0).abs().max() < 0.05  # uniform: no preferred direction
    assert torch.equal(x, uniform_sphere(2000, 16, make_generator(0)))


def test_sample_identities_unit_norm_and_reproducible():
    x = sample_identities(7, 0, 10)
    assert x.shape == (10, 512) and x.dtype == torch.float32
    assert torch.allclose(x.norm(dim=1), torch.ones(10), atol=1e-5)
    assert torch.equal(x, sample_identities(7, 0, 10))
    assert not torch.allclose(x, sample_identities(8, 0, 10))


def test_sample_identities_range_independent():
    full = sample_identities(7, 0, 20, dim=64)
    assert torch.equal(sample_identities(7, 5, 7, dim=64), full[5:12])
    assert torch.equal(sample_identities(7, 19, 1, dim=64), full[19:])
    assert sample_identities(7, 3, 0).shape == (0, 512)


@pytest.mark.parametrize("kwargs", [{"start": -1}, {"count": -1}, {"dim": 0}])
def test_sample_identities_rejects_bad_arguments(kwargs):
    args = {"job_seed": 1, "start": 0, "count": 2, "dim": 8} | kwargs
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        sample_identities(**args)


def test_embedding_noise_unit_rows_and_reproducible():
    refs = sample_identities(3, 0, 4)
    ids = [0, 1, 2, 3]
    x = embedding_noise(refs, ids, 6, job_seed=3)
    assert x.shape == (4, 6, 512) and x.dtype == torch.float32
    assert torch.allclose(x.norm(dim=-1), torch.ones(4, 6), atol=1e-5)
    assert torch.equal(x, embedding_noise(refs, ids, 6, job_seed=3))
    assert not torch.allclose(x, embedding_noise(refs, ids, 6, job_seed=4))
    assert not torch.allclose(x[:, 0], x[:, 1])  # each sample has its own noise


def test_embedding_noise_depends_only_on_identity_and_sample():
    refs = sample_identities(3, 0, 6)
    full = embedding_noise(refs, list(range(6)), 3, job_seed=3)
    part = embedding_noise(refs[[4, 1]], [4, 1], 3, job_seed=3)
    assert torch.equal(part, full[[4, 1]])


def test_embedding_noise_scale_zero_is_reference():
    refs = sample_identities(3, 0, 4)
    x = embedding_noise(refs, range(4), 5, job_seed=3, config=EmbeddingNoiseConfig(scale=0.0))
    assert torch.allclose(x, refs[:, None].expand(4, 5, 512), atol=1e-6)
    assert torch.allclose(mean_cosine(refs, x), torch.ones(4), atol=1e-5)


def test_embedding_noise_larger_scale_lower_cosine():
    refs = sample_identities(3, 0, 8)
    cos = [
        mean_cosine(refs, embedding_noise(refs, range(8), 16, 3, EmbeddingNoiseConfig(scale=s))).mean().item()
        for s in (0.01, 0.05, 0.2)
    ]
    assert 1.0 > cos[0] > cos[1] > cos[2]
    # per-coordinate sigma: the cosine is about 1 / sqrt(1 + scale^2 * D)
    assert cos[1] == pytest.approx((1 + 0.05**2 * 512) ** -0.5, abs=0.02)


def test_embedding_noise_rejects_bad_arguments():
    refs = sample_identities(3, 0, 2)
    with pytest.raises(ValueError, match="identity_ids"):
        embedding_noise(refs, [0], 2, 3)
    with pytest.raises(ValueError, match="references"):
        embedding_noise(refs[0], [0], 2, 3)
    with pytest.raises(ValueError, match="scale"):
        embedding_noise(refs, [0, 1], 2, 3, EmbeddingNoiseConfig(scale=-0.1))
