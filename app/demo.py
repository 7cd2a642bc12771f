"""`make demo`: start the embedded default (`idforge up`), run a small job through the real
service, and print where the dataset and its manifest are."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from app import layout
from app.client import Client
from app.servers import free_port, stop_group

SPEC = {
    "identities": 8,
    "images_per_identity": 4,
    "seed": 2026,
    "render": {"steps": 25, "guidance_scale": 3.0, "batch_size": 16},
    "metadata": {"source": "make demo"},
}


def main(data_dir: Path = Path(".idforge")) -> int:
    t0 = time.perf_counter()
    data_dir = data_dir.resolve()
    port = 8000 if _port_free(8000) else free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(data_dir.parent / ".idforge-demo.log", "wb") if data_dir.parent.exists() else None
    proc = subprocess.Popen([sys.executable, "-m", "workers.cli", "up", "--data-dir", str(data_dir),
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        _wait_ready(url, proc)
        t_up = time.perf_counter() - t0
        key = (data_dir / "api_keys").read_text().split(",")[0].partition(":")[2]
        print(f"service up at {url} in {t_up:.1f} s (Redis, Celery worker, API; data in {data_dir})")
        client = Client(url, key)
        t1 = time.perf_counter()
        job = client.submit(SPEC)
        print(f"submitted job {job['id']}: {SPEC['identities']} identities x "
              f"{SPEC['images_per_identity']} images")
        job = client.wait(job["id"], timeout=600, interval=0.25, on_update=_progress)
        t_job = time.perf_counter() - t1
        if job["status"] != "succeeded":
            print(f"job {job['status']}: {json.dumps(job.get('error'))}")
            return 1
        root = data_dir / "storage" / "jobs" / job["id"]
        manifest = json.loads((root / "manifest.json").read_text())
        on_disk = sorted((root / "dataset" / "imagefolder").rglob("*.jpg"))
        counts = manifest["counts"]
        print(f"job succeeded in {t_job:.1f} s ({counts['images'] / t_job:.1f} images/s end to end)")
        print(f"  dataset:  {root / 'dataset' / 'imagefolder'}  ({len(on_disk)} images on disk)")
        print(f"  manifest: {root / 'manifest.json'}  (counts {counts['images']} images of "
              f"{counts['requested']} requested, spec hash {manifest['spec_hash'][:12]})")
        tars = [json.loads(line)["path"] for line in (root / layout.OBJECTS).read_text().splitlines()]
        print(f"  objects:  {', '.join(sorted(manifest['outputs']) + tars)}")  # tars: the table the manifest pins
        q = manifest["quality"]["models"]
        print(f"  quality:  EER {q['job']['eer']} ({q['job']['name']}), {q['evaluator']['eer']} "
              f"({q['evaluator']['name']}); report {root / 'report' / 'report.html'}")
        print(f"  browse:   .venv/bin/idforge up --data-dir {data_dir}, then open its URL + /ui "
              f"(API key {key})")
        print(f"demo total {time.perf_counter() - t0:.1f} s")
        return 0 if len(on_disk) == counts["images"] == counts["requested"] else 1
    finally:
        stop_group(proc, timeout=60)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"`idforge up` exited with {proc.returncode}; see .idforge-demo.log")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the service did not become ready in {timeout:.0f} s")


_last: list[str] = [""]


def _progress(job: dict[str, object]) -> None:
    """One line each time the status, stage or image count changes."""
    p = job["progress"]
    assert isinstance(p, dict)
    line = (f"  {job['status']:<9} {job.get('stage') or '-'!s:<20} "
            f"{p['images_done']}/{p['images_total']} images")
    if line != _last[0]:
        print(line, flush=True)
        _last[0] = line


if __name__ == "__main__":
    sys.exit(main())
