"""A small HTTP client for the idforge API, used by the CLI, the demo and the tests."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

TERMINAL = {"succeeded", "failed", "canceled"}
RATE_LIMIT_WAIT_S = 60.0  # the longest an idempotent call waits out 429s before it raises


def _retry_after(r: httpx.Response) -> float | None:
    value = r.headers.get("retry-after", "")
    return float(value) if value.replace(".", "", 1).isdigit() else None


class ApiError(Exception):
    def __init__(self, response: httpx.Response) -> None:
        self.status = response.status_code
        try:
            self.problem = response.json()
        except ValueError:
            self.problem = {"detail": response.text}
        super().__init__(f"HTTP {self.status}: {self.problem.get('detail', self.problem)}")


class Client:
    def __init__(self, url: str, api_key: str, *, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout, transport=transport,
                                 headers={"Authorization": f"Bearer {api_key}"})

    def _ok(self, r: httpx.Response) -> Any:
        if r.status_code >= 400:
            raise ApiError(r)
        return r.json()

    def submit(self, spec: dict[str, Any], *, idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._ok(self.http.post("/v1/jobs", json=spec, headers=headers))  # type: ignore[no-any-return]

    def _idempotent(self, method: str, path: str, **kw: Any) -> Any:
        """A request that is safe to repeat: rate-limited (429) ones wait for Retry-After (at most
        RATE_LIMIT_WAIT_S in all), then go again."""
        waited = 0.0
        while True:
            r = self.http.request(method, path, **kw)
            delay = _retry_after(r) if r.status_code == 429 else None
            if delay is None or waited + delay > RATE_LIMIT_WAIT_S:
                return self._ok(r)
            time.sleep(delay)
            waited += delay

    def job(self, job_id: str) -> dict[str, Any]:
        return self._idempotent("GET", f"/v1/jobs/{job_id}")  # type: ignore[no-any-return]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._idempotent("POST", f"/v1/jobs/{job_id}/cancel")  # type: ignore[no-any-return]

    def delete(self, job_id: str, *, wait: bool = False, timeout: float = 600,
               interval: float = 0.5) -> dict[str, Any]:
        """Delete the job's data (idempotent); with `wait`, poll until `deleted_at` is set."""
        deadline = time.monotonic() + timeout
        job: dict[str, Any] = self._idempotent("DELETE", f"/v1/jobs/{job_id}")
        while wait and not job.get("deleted_at"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id}'s deletion is not finished after {timeout:.0f} s")
            time.sleep(interval)
            job = self.job(job_id)
        return job

    def jobs(self, *, status: str | None = None, metadata: dict[str, str] | None = None,
             created_after: str | None = None, created_before: str | None = None,
             limit: int = 100) -> Iterator[dict[str, Any]]:
        """The team's jobs, newest first, every page, filtered like `GET /v1/jobs`."""
        params: dict[str, Any] = {"limit": limit, **{f"metadata[{k}]": v for k, v in (metadata or {}).items()}}
        for k, v in (("status", status), ("created_after", created_after), ("created_before", created_before)):
            if v is not None:
                params[k] = v
        while True:
            page = self._idempotent("GET", "/v1/jobs", params=params)
            yield from page["jobs"]
            if not page["has_more"]:
                return
            params["after"] = page["next"]

    def artifacts(self, job_id: str, **params: Any) -> dict[str, Any]:
        return self._idempotent("GET", f"/v1/jobs/{job_id}/artifacts", params=params)  # type: ignore[no-any-return]

    def wait(self, job_id: str, *, timeout: float = 600, interval: float = 0.5,
             on_update: Callable[[dict[str, Any]], None] = lambda job: None) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            on_update(job)
            if job["status"] in TERMINAL:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job['status']} after {timeout:.0f} s")
            time.sleep(interval)

    def download(self, job_id: str, out: Path, *, page: int = 1000, family: bool = False) -> int:
        """Fetch the manifest, every image and every dataset object (tars, RecordIO, the index)
        through the presigned URLs; check each sha256. Returns the number of images.

        Pages through the listing (one page in memory at a time). Each page lists the objects its
        images need (the job-level ones and the tars of its shards); each is fetched once. An image
        that is not a loose file (a job without `imagefolder`) is read from its tar or train.rec,
        fetched with its page's objects, and checked against its digest there.

        family: also the jobs the job `extends`, oldest first, as one dataset: every job's loose
        images in one `out/dataset/imagefolder/` (their labels do not overlap), each job's manifest
        and objects under `out/jobs/{job_id}/`, and `out/family.json` listing the jobs with their
        labels."""
        if not family:
            return self._download_one(job_id, out, out, page)
        chain = self.lineage(job_id)
        n, members = 0, []
        for job in chain:
            got = self._download_one(job["id"], out, out / "jobs" / job["id"], page)
            output = job["spec"].get("output") or {}
            first = int(output.get("label_offset", 0))
            members.append({"job": job["id"], "images": got, "labels": [first, first + int(job["spec"]["identities"])],
                            "dir": f"jobs/{job['id']}"})
            n += got
        (out / "family.json").write_text(json.dumps({"jobs": members}, indent=1) + "\n")
        return n

    def lineage(self, job_id: str, *, limit: int = 64) -> list[dict[str, Any]]:
        """The job and the jobs it `extends`, oldest first (their records)."""
        chain = [self.job(job_id)]
        while chain[-1]["spec"].get("extends"):
            if len(chain) > limit:
                raise ValueError(f"job {job_id}: more than {limit} generations of `extends`")
            chain.append(self.job(chain[-1]["spec"]["extends"]))
        return chain[::-1]

    def _download_one(self, job_id: str, images: Path, objects: Path, page: int) -> int:
        """One job: its loose images under `images`, its manifest and other objects under `objects`."""
        import hashlib

        from app import dataset_index

        images.mkdir(parents=True, exist_ok=True)
        objects.mkdir(parents=True, exist_ok=True)
        n, after = 0, None
        fetched: set[str] = set()
        plain = httpx.Client(timeout=60)
        while True:
            params: dict[str, Any] = {"limit": page}
            if after:
                params["after"] = after
            art = self.artifacts(job_id, **params)
            if n == 0:
                r = plain.get(art["manifest_url"])
                r.raise_for_status()
                (objects / "manifest.json").write_bytes(r.content)
            for obj in art.get("objects", []):
                if obj["path"] not in fetched:
                    fetch_to_file(plain, obj["url"], _inside(objects, obj["path"]), obj["sha256"])
                    fetched.add(obj["path"])
            for f in art["files"]:
                if not f.get("path"):  # inside a tar or train.rec, already here
                    data = dataset_index.read_image(f, lambda key, start, length: _read_local(
                        _inside(objects, key), start, length))
                    if hashlib.sha256(data).hexdigest() != f["sha256"]:
                        raise OSError(f"{dataset_index.image_name(f)}: checksum mismatch")
                    n += 1
                    continue
                r = plain.get(f["url"])
                r.raise_for_status()
                if hashlib.sha256(r.content).hexdigest() != f["sha256"]:
                    raise OSError(f"{f['path']}: checksum mismatch")
                dest = _inside(images, f["path"])
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(r.content)
                n += 1
            if not art["has_more"]:
                return n
            after = art["next"]

    def download_report(self, job_id: str, out: Path) -> list[Path] | None:
        """Fetch a succeeded job's quality report (report.html, report.json, plots/*) into `out`
        through its presigned URLs; the files written, or None when the job has no report."""
        report = self.artifacts(job_id, limit=1).get("report")
        if report is None:
            return None
        wanted = {"report.html": report.get("html"), "report.json": report.get("json")}
        for name, url in (report.get("plots") or {}).items():
            if "/" in name or "\\" in name or name in ("", ".", ".."):
                raise ValueError(f"report plot name {name!r} is not a plain file name")
            wanted[f"plots/{name}"] = url
        out.mkdir(parents=True, exist_ok=True)
        written = []
        with httpx.Client(timeout=60) as plain:  # presigned URLs: no API key to the object store
            for rel, url in wanted.items():
                if url is None:
                    continue
                r = plain.get(url)
                r.raise_for_status()
                dest = out / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(r.content)
                written.append(dest)
        return written


def _inside(root: Path, rel: str) -> Path:
    """`root / rel`, refusing a path that would land outside `root`."""
    dest = (root / rel).resolve()
    if not dest.is_relative_to(root.resolve()):
        raise ValueError(f"artifact path {rel!r} leaves the download directory")
    return dest


def _read_local(path: Path, start: int, length: int | None) -> bytes:
    with path.open("rb") as f:
        f.seek(start)
        return f.read() if length is None else f.read(length)


def fetch_to_file(http: httpx.Client, url: str, dest: Path, sha256: str) -> None:
    """Stream a (possibly large) object to `dest`, checking its sha256 before it takes the name."""
    import hashlib

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part")
    h = hashlib.sha256()
    with http.stream("GET", url) as r, tmp.open("wb") as f:
        r.raise_for_status()
        for chunk in r.iter_bytes(1 << 20):
            h.update(chunk)
            f.write(chunk)
    if h.hexdigest() != sha256:
        tmp.unlink()
        raise OSError(f"{dest.name}: checksum mismatch")
    tmp.replace(dest)


