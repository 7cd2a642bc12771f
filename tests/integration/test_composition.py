"""Composing identity sets through the whole service (real Redis, SeaweedFS, a Celery worker, the
API): a second job that excludes the first keeps every identity at least the bound away from the
first job's identities, checked by angle on the identity files both jobs stored; with the same
seed, the second job would otherwise have drawn exactly the first one's identities."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load

from tests.integration.test_faults import BUCKET, LATENT, Stack

pytestmark = pytest.mark.integration

SPEC: dict[str, Any] = {"identities": 6, "images_per_identity": 2, "seed": 71, "models": LATENT,
                        "variations": {"method": "dispersion", "iterations": 0}, "quality": {"report": True}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("composition"), model_dir)
    try:
        yield s
    finally:
        s.stop()


def _identities(stack: Stack, job_id: str) -> dict[str, torch.Tensor]:
    body = stack.s3.client().get_object(Bucket=BUCKET, Key=f"jobs/{job_id}/identities/embeddings.safetensors")["Body"]
    return load(io.BytesIO(body.read()).getvalue())


def _angles(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    cos = torch.nn.functional.normalize(x.double(), dim=1) @ torch.nn.functional.normalize(y.double(), dim=1).T
    return torch.rad2deg(torch.arccos(cos.clamp(-1, 1)))


def test_a_job_excluding_another_keeps_its_identities_away_by_the_bound(stack: Stack) -> None:
    first = stack.wait_job(stack.alpha.submit(SPEC)["id"], timeout=240)
    assert first["status"] == "succeeded", stack.logs()
    same = stack.wait_job(stack.alpha.submit({**SPEC, "output": {"formats": ["webdataset"]}})["id"], timeout=240)
    a, same_ids = _identities(stack, first["id"]), _identities(stack, same["id"])
    assert float(_angles(a["embeddings"], same_ids["embeddings"]).diagonal().max()) < 1e-3  # the same draws

    bound = 2.0
    spec = {**SPEC, "sampler": {"method": "random", "exclude": [first["id"]], "exclude_min_angle_deg": bound}}
    second = stack.wait_job(stack.alpha.submit(spec)["id"], timeout=240)
    assert second["status"] == "succeeded", (second, stack.logs())
    b = _identities(stack, second["id"])
    assert float(_angles(b["embeddings"], a["embeddings"]).min()) >= bound
    manifest = stack.alpha.artifacts(second["id"])["manifest"]
    ex = manifest["sampling"]["exclusion"]
    assert ex["sources"] == [{"job": first["id"], "identities": 6}] and ex["min_angle_deg"] >= bound
    assert len(ex["redraws"]) == 6

    # Reproducible from its manifest: `idforge reproduce` fetches the excluded job's identities.
    out = stack.root / "reproduced"
    r = subprocess.run([sys.executable, "-m", "workers.cli", "reproduce", second["id"], "--out", str(out),
                        "--url", stack.url, "--api-key", "key-alpha", "--json"],
                       env=stack.env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["verdict"] in ("identical", "equivalent")

    # Past what the sampler can reach, the job fails and says how close it got.
    failed = stack.wait_job(stack.alpha.submit({**spec, "seed": 72, "sampler": {
        **spec["sampler"], "exclude_min_angle_deg": 170}})["id"], timeout=240)
    assert failed["status"] == "failed" and failed["error"]["code"] == "exclusion_unreachable"
    assert "170" in failed["error"]["message"]
