"""The embedded default: `idforge up` (Redis, a Celery worker and the API with local storage)
driven as a user would, with plain HTTP and with the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.servers import free_port
from tests.servers import Proc, wait_http

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[tuple[str, str, Path]]:
    data = tmp_path_factory.mktemp("up")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDFORGE_")}
    env.update(HF_HUB_OFFLINE="1", IDFORGE_MODEL_DIR=str(model_dir))
    proc = Proc(["up", "--data-dir", str(data), "--port", str(port)], env, data / "up.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/readyz", proc=proc)
        out = (data / "up.log").read_text()
        key = (data / "api_keys").read_text().partition(":")[2].strip()
        assert url in out and key in out  # it prints the URL and the API key
        yield url, key, data
    finally:
        proc.stop()
    assert proc.proc.returncode is not None
    # Redis kept its data in the data dir, append-only.
    assert any((data / "redis").rglob("*.aof*"))


def cli(url: str, key: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "IDFORGE_URL": url, "IDFORGE_API_KEY": key}
    return subprocess.run([sys.executable, "-m", "workers.cli", *args], input=stdin, env=env,
                          capture_output=True, text=True, timeout=300)


def test_curl_style_post_reaches_succeeded(up: tuple[str, str, Path]) -> None:
    url, key, data = up
    r = httpx.post(f"{url}/v1/jobs", headers={"Authorization": f"Bearer {key}"},
                   content=json.dumps({"identities": 3, "images_per_identity": 2,
                                       "render": {"steps": 3}}),
                   )  # no Content-Type header at all: JSON is assumed
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    res = cli(url, key, "status", job_id)
    assert res.returncode == 0 and json.loads(res.stdout)["id"] == job_id
    from app.client import Client

    job = Client(url, key).wait(job_id, timeout=180)
    assert job["status"] == "succeeded"
    manifest = data / "storage" / "jobs" / job_id / "manifest.json"
    assert json.loads(manifest.read_text())["counts"]["images"] == 6


def test_cli_submit_wait_status_and_download(up: tuple[str, str, Path], tmp_path: Path) -> None:
    url, key, _ = up
    spec = json.dumps({"identities": 2, "images_per_identity": 3, "render": {"steps": 2}})
    res = cli(url, key, "submit", "-", "--wait", "--timeout", "180", stdin=spec)
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.splitlines()[0]
    assert json.loads("\n".join(res.stdout.splitlines()[1:]))["images"] == 6
    res = cli(url, key, "download", job_id, str(tmp_path / "ds"))
    assert res.returncode == 0, res.stderr
    images = sorted((tmp_path / "ds" / "dataset" / "imagefolder").rglob("*.jpg"))
    assert [p.relative_to(tmp_path / "ds" / "dataset" / "imagefolder").as_posix()
            for p in images] == [f"{i:06d}/{s:03d}.jpg" for i in range(2) for s in range(3)]
    assert json.loads((tmp_path / "ds" / "manifest.json").read_text())["job_id"] == job_id
    # The dataset's other objects come along, checked against the manifest's sha256.
    assert (tmp_path / "ds" / "dataset" / "index.parquet").stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "ds" / "dataset" / "webdataset").iterdir()) == ["000000.tar"]


def test_cli_submit_refused_spec_and_wrong_key(up: tuple[str, str, Path]) -> None:
    url, key, _ = up
    bad = cli(url, key, "submit", "-", stdin='{"identities": -1, "images_per_identity": 1}')
    assert bad.returncode == 2 and "identities" in bad.stderr
    wrong = cli(url, "not-a-key", "status", "j1")
    assert wrong.returncode == 2 and "unauthorized" in wrong.stderr


def test_cli_submit_wait_fails_when_the_job_is_canceled(up: tuple[str, str, Path]) -> None:
    url, key, _ = up
    spec = {"identities": 40, "images_per_identity": 8, "render": {"steps": 8, "batch_size": 2}}
    proc = subprocess.Popen([sys.executable, "-m", "workers.cli", "submit", "-", "--wait"],
                            env={**os.environ, "IDFORGE_URL": url, "IDFORGE_API_KEY": key},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdin and proc.stdout
    proc.stdin.write(json.dumps(spec))
    proc.stdin.close()
    job_id = proc.stdout.readline().strip()
    httpx.post(f"{url}/v1/jobs/{job_id}/cancel", headers={"Authorization": f"Bearer {key}"})
    assert proc.wait(120) == 1
