"""What a worker process holds: settings, clients, and models loaded once per process."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from app import catalog
from app.queue import TaskQueue
from app.settings import Settings
from app.storage import Storage, storage_from_settings
from app.store import JobStore
from models import registry

log = logging.getLogger("idforge.worker")


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


@dataclass
class ModelCache:
    """Models loaded once per process, by catalogue name, from verified weights."""

    model_dir: Path
    device: str
    _models: dict[str, Any] = field(default_factory=dict)

    def generator(self, name: str) -> Any:
        if name not in self._models:
            registry.ensure_model(name, self.model_dir)
            self._models[name] = registry.load_generator(name, self.model_dir, self.device)
        return self._models[name]

    def embedder(self, name: str) -> Any:
        if name not in self._models:
            registry.ensure_model(name, self.model_dir)
            self._models[name] = registry.load_embedder(name, self.model_dir, self.device)
        return self._models[name]

    def weights(self, name: str) -> dict[str, Any]:
        """What the manifest records of a model: name, licence notes and weight sha256."""
        return {"name": name, "license": registry.get_spec(name).license,
                "sha256": registry.weights_sha256(name, self.model_dir)}


@dataclass
class Runtime:
    settings: Settings
    store: JobStore
    storage: Storage
    queue: TaskQueue
    models: ModelCache

    @classmethod
    def from_settings(cls, s: Settings) -> "Runtime":
        return cls(settings=s, store=JobStore.from_url(s.redis_url),
                   storage=storage_from_settings(s), queue=TaskQueue.from_settings(s),
                   models=ModelCache(s.model_dir, pick_device(s.device)))

    def check_models(self) -> dict[str, dict[str, Any]]:
        """Verify every catalogue model's weights against the registry's pins; publish the result
        so `GET /v1/models` shows what this worker can run."""
        out: dict[str, dict[str, Any]] = {}
        for name in catalog.CATALOG:
            try:
                registry.ensure_model(name, self.settings.model_dir)
                v = registry.verify(name, self.settings.model_dir)
                out[name] = {"ok": v.ok, "reason": v.reason, "sha256": v.sha256}
            except Exception as e:  # a broken model must not stop the worker serving the others
                out[name] = {"ok": False, "reason": f"{type(e).__name__}: {e}", "sha256": None}
            if not out[name]["ok"]:
                log.error("model %s refused: %s", name, out[name]["reason"])
        self.store.publish_models(f"{socket.gethostname()}:{os.getpid()}", out)
        return out


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
