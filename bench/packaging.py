"""Packaging throughput: JPEG encode + WebDataset shard write + upload, images/s per core, against
encoding alone.

The full path is what a render shard does once its 112x112 crops exist: encode each RGB crop with
the pipeline's own encoder (`models.alignment.template.encode_image`: JPEG, quality 95, 4:4:4), make its
WebDataset sample (`.jpg` + `.cls` + `.json`), write the shard's tar to a temp file and upload it
with `Storage.put_file` (a multipart upload in 8 MiB parts above 8 MiB). The reference encodes the
same images and does nothing else. The two run shard by shard, interleaved in the same run, so
load from other processes hits both alike. One thread does the work (torch and OpenCV set to one
thread; PIL encodes on the calling thread), so images/s of wall time is per core; the bench
process's CPU time (boto3's transfer threads included) and, for SeaweedFS, the server's CPU time
are reported beside it.

Upload target: a SeaweedFS `weed mini` that the bench starts on loopback when the `weed` binary is
there (the integration tests' S3 server, real SigV4), else a local directory; the line says which.
One small object is uploaded before timing: SeaweedFS allocates its first volume on the first write.
Images: 112x112 crops of scikit-image's astronaut photograph at shifting positions and scales,
resized with area averaging (random noise would make JPEG unrealistically slow and large).

    python -m bench.packaging [--quick] [--images 8192] [--shard 2048] [--storage auto|seaweedfs|local]

`--quick` (what `python -m bench` runs): 1024 images in shards of 512, a few seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from app.layout import JobKeys
from app.storage import MULTIPART_PART, LocalStorage, S3Storage, Storage
from bench import emit, quick_summary, set_threads
from models.alignment.template import encode_image
from models.seeding import derive_seed
from workers.outputs.webdataset import webdataset_sample, write_webdataset_tar

IMAGES = 8192  # images per variant
SHARD = 2048  # images per WebDataset shard (about 15 MB of JPEG: a multipart upload)
QUICK_IMAGES, QUICK_SHARD = 1024, 512  # --quick
SIZE = 112  # crop side, the ArcFace template's
PER_IDENTITY = 64  # images per identity, for the samples' keys and labels
QUALITY = 95  # JPEG quality, the job default
TARGET = 1500  # images/s per core the full path must reach (issue 6)
SEED = 0  # seeds the crop positions and the samples' seeds


def photo_crops(n: int, seed: int = SEED) -> list[torch.Tensor]:
    """`n` uint8 [SIZE, SIZE, 3] crops of the astronaut photograph, each a square of side 112..256 at
    a random position, area-resized to SIZE (a packaged photo: nothing is downloaded)."""
    from skimage import data

    photo = data.astronaut()  # type: ignore[no-untyped-call]  # uint8 [512, 512, 3] RGB
    rng = random.Random(seed)
    crops = []
    for _ in range(n):
        side = rng.randrange(SIZE, 257)
        y, x = rng.randrange(0, 512 - side + 1), rng.randrange(0, 512 - side + 1)
        crop = cv2.resize(photo[y:y + side, x:x + side], (SIZE, SIZE), interpolation=cv2.INTER_AREA)
        crops.append(torch.from_numpy(np.ascontiguousarray(crop)))  # [SIZE, SIZE, 3]
    return crops


@dataclass
class Clock:
    """Wall and process CPU seconds spent in one variant, by stage."""

    wall: float = 0.0
    cpu: float = 0.0
    stages: dict[str, float] | None = None

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        w0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            dw = time.perf_counter() - w0
            self.wall += dw
            self.cpu += time.process_time() - c0
            self.stages = self.stages or {}
            self.stages[name] = self.stages.get(name, 0.0) + dw


def encode_only(crops: list[torch.Tensor], clock: Clock) -> int:
    """The reference: encode every crop, keep nothing. Returns the bytes produced."""
    total = 0
    with clock.stage("encode"):
        for crop in crops:
            total += len(encode_image(crop, "jpeg", quality=QUALITY))
    return total


def package_shard(crops: list[torch.Tensor], first: int, shard: int, storage: Storage, keys: JobKeys,
                  scratch: Path, clock: Clock) -> tuple[str, Path]:
    """The full path for one shard: encode, WebDataset tar to a temp file, upload. Returns the key
    and the tar (left for the caller to check, then delete)."""
    with clock.stage("encode"):
        images = [encode_image(crop, "jpeg", quality=QUALITY) for crop in crops]
    tar = scratch / f"{shard:06d}.tar"
    with clock.stage("tar"):
        samples = []
        for k, data in enumerate(images):
            i, s = divmod(first + k, PER_IDENTITY)
            meta = {"seed": derive_seed(SEED, "render", i, s), "shard": shard, "reference_cosine": 0.7}
            samples.append(webdataset_sample(i, s, "jpg", data, meta))
        with tar.open("wb") as f:
            write_webdataset_tar(f, samples)
    key = keys.key(f"dataset/webdataset/{shard:06d}.tar")
    with clock.stage("upload"):
        storage.put_file(key, tar, "application/x-tar")
    return key, tar


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def upload_target(kind: str, scratch: Path) -> Iterator[tuple[Storage, str, int | None]]:
    """(storage, description, server pid or None): SeaweedFS on loopback or a local directory."""
    from tests.servers import SeaweedS3, weed_binary

    if kind == "auto":
        try:
            weed_binary()
            kind = "seaweedfs"
        except RuntimeError:
            kind = "local"
    if kind == "local":
        yield LocalStorage(scratch / "store"), "local directory", None
        return
    srv = SeaweedS3(scratch / "weed")
    try:
        srv.start(bucket="bench")  # inside try: a failed start still stops the server
        assert srv.proc is not None
        st = S3Storage("bench", client=srv.client())
        yield st, f"SeaweedFS weed mini on loopback (multipart from {MULTIPART_PART >> 20} MiB)", srv.proc.pid
    finally:
        srv.stop()


def measure(n: int, shard_size: int, storage_kind: str) -> list[str]:
    crops = photo_crops(n)
    keys = JobKeys.for_job("bench", "packaging")
    full, enc = Clock(), Clock()
    with tempfile.TemporaryDirectory() as tmp, upload_target(storage_kind, Path(tmp)) as (storage, where, pid):
        scratch = Path(tmp)
        encode_only(crops[:32], Clock())  # warm-up: libjpeg tables, first allocations
        warm = scratch / "warm-up.bin"
        warm.write_bytes(b"warm-up")
        storage.put_file(keys.key("warm-up.bin"), warm)  # SeaweedFS grows its first volume on first write
        server0 = process_cpu_s(pid) if pid else 0.0
        jpeg_bytes, tar_bytes, shards = 0, 0, 0
        for first in range(0, n, shard_size):
            part = crops[first:first + shard_size]
            jpeg_bytes += encode_only(part, enc)
            key, tar = package_shard(part, first, shards, storage, keys, scratch, full)
            tar_bytes += tar.stat().st_size
            if shards == 0:  # the uploaded object is the tar, byte for byte
                storage.get_file(key, scratch / "check.tar")
                if (scratch / "check.tar").read_bytes() != tar.read_bytes():
                    raise RuntimeError(f"{key}: the uploaded object differs from the tar written")
            tar.unlink()
            shards += 1
        server_cpu = process_cpu_s(pid) - server0 if pid else None
    rate_full, rate_enc = n / full.wall, n / enc.wall
    stages = full.stages or {}
    verdict = "met" if rate_full >= TARGET else "NOT met"
    lines = [
        (f"packaging encode+webdataset+upload: {rate_full:.0f} img/s per core | encode only: "
         f"{rate_enc:.0f} img/s | full/encode {rate_full / rate_enc:.2f} | target >= {TARGET}: {verdict}"),
        f"  full path by stage, us/img: encode {1e6 * stages.get('encode', 0) / n:.0f}, tar "
        f"{1e6 * stages.get('tar', 0) / n:.0f}, upload {1e6 * stages.get('upload', 0) / n:.0f}; bench "
        f"process CPU {n / full.cpu:.0f} img/s per CPU-s (encode only {n / enc.cpu:.0f})"
        + (f"; server CPU {1e3 * server_cpu / n:.2f} ms/img" if server_cpu is not None else ""),
        (f"  ({n} images {SIZE}x{SIZE} JPEG q{QUALITY} 4:4:4 of a photo, mean {jpeg_bytes / n / 1024:.1f} KiB; "
         f"{shards} shards of {shard_size}, {tar_bytes / shards / 2**20:.1f} MiB each; upload to {where})"),
    ]
    return lines


def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(prog="python -m bench.packaging", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"{QUICK_IMAGES} images in shards of {QUICK_SHARD}")
    p.add_argument("--images", type=int, default=None, help=f"images per variant (default {IMAGES})")
    p.add_argument("--shard", type=int, default=None, help=f"images per shard (default {SHARD})")
    p.add_argument("--storage", choices=["auto", "seaweedfs", "local"], default="auto",
                   help="upload target (auto: SeaweedFS when `weed` is installed)")
    args = p.parse_args(argv)
    n = args.images or (QUICK_IMAGES if args.quick else IMAGES)
    shard = args.shard or (QUICK_SHARD if args.quick else SHARD)
    if n < 1 or shard < 1:
        p.error(f"--images, --shard: must be >= 1, got {n}, {shard}")
    set_threads(p, 1)  # one core: the rates are per core
    cv2.setNumThreads(1)
    lines = measure(n, shard, args.storage)
    return emit(lines, "cpu, 1 thread")


def run() -> str:
    """`python -m bench` entry: the quick subset, as one summary line."""
    return quick_summary(main)


if __name__ == "__main__":
    main()
