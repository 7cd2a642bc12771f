"""Cone variations through a whole job (in-process, the tiny Arc2Face preset): the manifest and the
quality report state the cone and confirm every conditioning embedding stayed within it; a spec
that gives two spreads is refused naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.settings import Settings
from app.spec import JobSpec
from workers.local import generate


def test_a_cone_job_reports_its_widest_angle_within_the_cone(tmp_path: Path, model_dir: Path) -> None:
    spec = JobSpec.model_validate({"identities": 3, "images_per_identity": 4, "seed": 5,
                                   "variations": {"method": "embedding_noise", "cone_degrees": 35},
                                   "render": {"steps": 2, "batch_size": 4}, "quality": {"report": True}})
    manifest = generate(spec, tmp_path / "out", settings=Settings(model_dir=model_dir, shard_identities=2))
    cone = manifest["realised"]["cone"]
    assert cone["half_angle_deg"] == 35 and cone["within"] is True
    assert 34.0 < cone["max_angle_deg"] <= 35.0001  # 512-d: the widest sample is at the rim
    assert manifest["realised"]["noise_scale"] == 0.0
    report = json.loads((tmp_path / "out" / "report" / "report.json").read_text())
    assert report["summary"]["variations"]["cone"] == cone
    html = (tmp_path / "out" / "report" / "report.html").read_text()
    assert "uniform within 35&deg;" in html and "within the cone" in html


@pytest.mark.parametrize("variations", [
    {"method": "embedding_noise", "cone_degrees": 30, "scale": 0.1},
    {"method": "embedding_noise", "cone_degrees": 30, "target_cosine": 0.7},
    {"method": "embedding_noise", "cone_degrees": 0},
    {"method": "embedding_noise", "cone_degrees": 90.5},
])
def test_malformed_cone_specs_are_refused(variations: dict[str, object]) -> None:
    with pytest.raises(ValidationError) as e:
        JobSpec.model_validate({"identities": 1, "images_per_identity": 1, "variations": variations})
    assert e.value.errors()[0]["loc"][0] == "variations"
