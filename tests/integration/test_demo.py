"""`make demo` as the README shows it: the embedded default, a job through the real service."""

from __future__ import annotations

from pathlib import Path

import pytest

from app import demo

pytestmark = pytest.mark.integration


def test_make_demo_runs_a_job_through_the_embedded_service(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(tmp_path / "data") == 0
    out = capsys.readouterr().out
    assert "job succeeded" in out and "(counts 32 images of 32 requested" in out
    assert "dataset/webdataset/000000.tar" in out and "report.html" in out
    assert len(list((tmp_path / "data" / "storage").rglob("*.jpg"))) == 32
