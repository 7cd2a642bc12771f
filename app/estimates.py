"""What a job costs before it runs: images, stored bytes and GPU-seconds, from a throughput table
that the workers fill with what they observe (docs/scheduling.md, "Estimates").

The table is a Redis hash, one field per cost, each an exponentially weighted mean of the
observations (weight ALPHA to the newest) with its count:
- `render:<generator>:<embedder>:<variations>`: seconds a render shard took per image-unit, where an
  image's units are its diffusion steps (embedding-conditioned generators) or 1 + its variation
  iterations (latent generators: Dispersion and DisCo run a forward and backward pass per step);
- `sample:<method>:<model>`: seconds identity sampling took per identity-iteration;
- `bytes:<image_format>:<image_size>`: encoded bytes of one image.
A worker measures wall time on its device: on a GPU worker that is the time the GPU was held.
Until a worker has measured a cost, DEFAULTS stand in and the estimate says so (`source`).
The scheduler weighs a shard by the same figures (`shard_seconds`).
"""

from __future__ import annotations

import json
import math
from typing import Any

from app import catalog
from app.redis_client import PREFIX as P
from app.redis_client import translate
from app.spec import JobSpec

TABLE = P + "throughput"
ALPHA = 0.2  # weight of the newest observation in the running mean

# Stand-ins until measured. Tiny presets: measured on a 2-core AMD EPYC CPU (bench/scale.py,
# bench/render.py). Published models: assumed H100 figures (Stable Diffusion 1.5 at 512 px with
# classifier-free guidance, about 30 ms an image-step in batches of 16; StyleGAN2 forward and
# backward passes), to be replaced by the first measurement.
DEFAULTS: dict[str, float] = {
    "render:stylegan2-tiny": 0.002,
    "render:arc2face-tiny": 0.02,
    "render:arc2face": 0.03,
    "render:stylegan2-ffhq-256": 0.004,
    "render:stylegan2-ffhq-1024": 0.02,
    "sample:random": 0.0001,
    "sample:hyperface": 0.00005,
    "sample:langevin": 0.002,
    "bytes:jpeg": 0.35,  # x image_size^2 (a 112 px JPEG at quality 95: about 4.4 KB)
    "bytes:png": 2.2,
}
INDEX_BYTES_PER_IMAGE = 62  # the Parquet index's row (bench/scale.py: 618,065 B for 10,000 images)
EVALUATOR_DIM = 128  # SFace, stored beside the job embedder's in the shards' features

# KEYS[1] the table; ARGV: field, observation, alpha. A running mean with its count.
_OBSERVE = """
local v = redis.call('HGET', KEYS[1], ARGV[1])
local x, a = tonumber(ARGV[2]), tonumber(ARGV[3])
local mean, n = x, 1
if v then
  local e = cjson.decode(v)
  mean, n = e['mean'] + a * (x - e['mean']), e['n'] + 1
end
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode({mean = mean, n = n, at = tonumber(t[1])}))
return 1
"""


def image_units(spec: JobSpec) -> int:
    """What one image costs in the table's units: diffusion steps, or 1 + variation iterations."""
    entry = catalog.CATALOG[spec.models.generator]
    if entry.conditioning == "embedding":
        return spec.render.steps
    return 1 + int(getattr(spec.variations, "iterations", 0))


def render_key(spec: JobSpec) -> str:
    return f"render:{spec.models.generator}:{spec.models.embedder}:{spec.variations.method}"


def sample_key(spec: JobSpec) -> str:
    model = spec.models.embedder if spec.sampler.method != "langevin" else spec.models.generator
    return f"sample:{spec.sampler.method}:{model}"


def bytes_key(spec: JobSpec) -> str:
    return f"bytes:{spec.output.image_format}:{spec.output.image_size}"


def sampler_units(spec: JobSpec) -> int:
    """Identity-iterations of the job's sampling (the gallery of HyperFace is counted as iterations
    of its generator's render, below)."""
    return spec.identities * int(getattr(spec.sampler, "iterations", 1))


class Throughput:
    """The table in Redis: workers `observe`, the API and the scheduler read."""

    def __init__(self, client: Any) -> None:
        self.r: Any = client
        self._observe = client.register_script(_OBSERVE)

    def observe(self, key: str, value: float) -> None:
        if not math.isfinite(value) or value <= 0:
            return
        with translate():
            self._observe(keys=[TABLE], args=[key, repr(float(value)), ALPHA])

    def table(self) -> dict[str, dict[str, Any]]:
        with translate():
            raw = self.r.hgetall(TABLE)
        out = {}
        for k, v in raw.items():
            try:
                out[k] = json.loads(v)
            except ValueError:
                continue
        return out


def _cost(table: dict[str, dict[str, Any]], key: str, default_key: str) -> tuple[float, str]:
    got = table.get(key)
    if got and isinstance(got.get("mean"), int | float) and got["mean"] > 0:
        return float(got["mean"]), "measured"
    return DEFAULTS.get(default_key, DEFAULTS["render:arc2face"]), "default"


def shard_seconds(spec: JobSpec, identities: int, table: dict[str, dict[str, Any]]) -> float:
    """Estimated GPU-seconds of a render shard of `identities` identities."""
    per, _ = _cost(table, render_key(spec), f"render:{spec.models.generator}")
    return identities * spec.images_per_identity * image_units(spec) * per


def estimate(spec: JobSpec, table: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Images, stored bytes and GPU-seconds of a job, and where each figure comes from."""
    images = spec.rendered_identities * spec.images_per_identity  # in the dataset
    render_per, render_src = _cost(table, render_key(spec), f"render:{spec.models.generator}")
    sample_per, sample_src = _cost(table, sample_key(spec), f"sample:{spec.sampler.method}")
    render_s = spec.images_to_render * image_units(spec) * render_per
    sample_s = sampler_units(spec) * sample_per if not spec.reused_identities else 0.0  # a preview's
    if spec.sampler.method == "hyperface" and not spec.reused_identities:  # its gallery is rendered by the gallery generator
        gallery = spec.models.gallery_generator or spec.models.generator
        per, _ = _cost(table, f"render:{gallery}", f"render:{gallery}")
        units = spec.render.steps if catalog.CATALOG[gallery].conditioning == "embedding" else 1
        sample_s += getattr(spec.sampler, "gallery_size", 0) * units * per
    measured = table.get(bytes_key(spec))
    if measured and measured.get("mean", 0) > 0:
        image_bytes, bytes_src = float(measured["mean"]), "measured"
    else:
        image_bytes = DEFAULTS[f"bytes:{spec.output.image_format}"] * spec.output.image_size ** 2
        bytes_src = "default"
    dim = catalog.CATALOG[spec.models.embedder].embedding_dim or 512
    features = 4 * (dim + (EVALUATOR_DIM if spec.quality.report else 0))
    copies = len(spec.output.formats)
    stored = images * (image_bytes * copies + features + INDEX_BYTES_PER_IMAGE)
    return {
        "images": images,
        "stored_bytes": int(stored),
        "gpu_seconds": round(render_s + sample_s, 1),
        "breakdown": {
            "render_gpu_seconds": round(render_s, 1), "sampling_gpu_seconds": round(sample_s, 1),
            "image_bytes": round(image_bytes, 1), "image_copies": copies,
            "features_bytes_per_image": features, "index_bytes_per_image": INDEX_BYTES_PER_IMAGE,
        },
        "source": {"render": render_src, "sampling": sample_src, "bytes": bytes_src},
        "basis": {"render": render_key(spec), "sampling": sample_key(spec), "bytes": bytes_key(spec)},
    }
