"""Model names -> implementation, config, weight location and pinned sha256.

The built-in table (`models/zoo.py`) names the published models and the tiny presets, with the
same names as the public catalogue (`app/catalog.py`; a test checks the two agree). A model's
files live in `model_dir / name`, or are fetched there from an `s3://` prefix. An operator's
registry file (YAML or JSON, `IDFORGE_MODEL_REGISTRY`) pins the sha256 of published weights, which
idforge cannot know in advance, and may point a model at another location:

    models:
      arcface-r100:
        location: s3://weights/arcface-r100/
        sha256:
          backbone.pth: 5f1a...e3

Nothing is loaded unless every required file is present with its pinned sha256; a file without a
pin is refused like a mismatched one. A missing tiny preset is copied into the model directory
from the files idforge ships (`models/presets/`: built once from a fixed seed, shipped as bytes
because rebuilt bytes depend on the CPU's numerics). Nothing is ever downloaded from the internet:
the only remote is the operator's own S3 prefix, through a fetch function the caller injects.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from models.modelspec import (
    Device,
    ModelKind,
    ModelSpec,
    ModelUnavailable,
    VerifyResult,
    WeightFile,
)
from models.presets import PRESETS_DIR, copy_preset
from models.zoo import LOADERS, SPECS

# (s3 uri, destination file) -> None: copies one object to a local file. Injected by the worker.
Fetch = Callable[[str, Path], None]
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

__all__ = [
    "SPECS", "ModelSpec", "ModelUnavailable", "Registry", "VerifyResult", "WeightFile", "ensure_model",
    "file_sha256", "get_spec", "load_embedder", "load_generator", "load_overrides", "verify",
    "weights_sha256",
]

_hash_cache: dict[tuple[str, int, int, int, int], str] = {}  # (path, inode, size, mtime, ctime) -> sha256


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks.

    Cached per (path, inode, size, mtime, ctime), so a worker verifying a model at start-up and again
    at load time hashes its gigabytes once; any rewrite of the file changes the ctime.
    """
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _hash_cache:
        _hash_cache[key] = hash_file(path)
    return _hash_cache[key]


def hash_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks, uncached (files written once, such as a
    shard's outputs)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_overrides(path: str | Path, specs: Mapping[str, ModelSpec] = SPECS) -> dict[str, ModelSpec]:
    """`specs` with the operator's registry file applied: pins and locations of known models.

    Raises ValueError naming the offending entry: an unknown model or file, a malformed sha256, a
    pin that contradicts one built into idforge, or a location that is neither absolute nor s3://.
    """
    path = Path(path)
    text = path.read_text("utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        doc = yaml.safe_load(text) or {}
    else:
        doc = json.loads(text)
    if not isinstance(doc, dict) or not isinstance(doc.get("models", {}), dict):
        raise ValueError(f"{path}: expected a mapping with a 'models' mapping")
    out = dict(specs)
    for name, entry in (doc.get("models") or {}).items():
        where = f"{path}: models.{name}"
        if name not in specs:
            raise ValueError(f"{where}: unknown model; known: {sorted(specs)}")
        if not isinstance(entry, dict) or set(entry) - {"location", "sha256"}:
            raise ValueError(f"{where}: expected a mapping with 'location' and/or 'sha256'")
        spec = specs[name]
        files = dict(spec.files)
        for rel, digest in (entry.get("sha256") or {}).items():
            if rel not in files:
                raise ValueError(f"{where}.sha256.{rel}: not a file of {name}; its files: {sorted(files)}")
            if not isinstance(digest, str) or not SHA256_RE.match(digest.lower()):
                raise ValueError(f"{where}.sha256.{rel}: expected 64 hex digits, got {digest!r}")
            built_in = files[rel].sha256
            if built_in is not None and built_in != digest.lower():
                raise ValueError(f"{where}.sha256.{rel}: idforge pins {built_in}; refusing {digest}")
            files[rel] = dataclasses.replace(files[rel], sha256=digest.lower())
        location = entry.get("location", spec.location)
        if location is not None and not (str(location).startswith("s3://") or Path(location).is_absolute()):
            raise ValueError(f"{where}.location: expected an absolute directory or s3://bucket/prefix, "
                             f"got {location!r}")
        out[name] = dataclasses.replace(spec, files=files, location=location)
    return out


class Registry:
    """Models by name over one model directory: verify, copy a shipped preset or fetch, and load.

    `specs` defaults to the built-in table; pass `load_overrides(...)` to apply an operator's
    registry file. `fetch` copies an s3:// object to a local file (needed only for models whose
    location is an S3 prefix). `presets` is where the tiny presets' shipped files are read from
    (default: the installed `models/presets`).
    """

    def __init__(self, model_dir: str | Path, specs: Mapping[str, ModelSpec] = SPECS,
                 fetch: Fetch | None = None, presets: str | Path = PRESETS_DIR) -> None:
        self.model_dir = Path(model_dir)
        self.specs = dict(specs)
        self.fetch = fetch
        self.presets = Path(presets)

    def spec(self, name: str) -> ModelSpec:
        """The spec of a registered model; ValueError naming `name` otherwise."""
        if name not in self.specs:
            raise ValueError(f"name: unknown model {name!r}; registered: {sorted(self.specs)}")
        return self.specs[name]

    def root(self, name: str) -> Path:
        """The directory `name`'s files are read from."""
        spec = self.spec(name)
        if spec.location is not None and not spec.location.startswith("s3://"):
            return Path(spec.location)
        return self.model_dir / name

    def verify(self, name: str) -> VerifyResult:
        """Check every file of `name`: required ones present, and every present one pinned and matching."""
        spec = self.spec(name)
        root = self.root(name)
        found: dict[str, str] = {}
        problems: list[str] = []
        missing: list[str] = []
        for rel, f in spec.files.items():
            path = root / rel
            if not path.is_file():
                if not f.optional:
                    missing.append(rel)
                continue
            found[rel] = file_sha256(path)
            if f.sha256 is None:
                problems.append(f"{rel}: no sha256 is pinned for it; add models.{name}.sha256.{rel} to the "
                                f"registry file (IDFORGE_MODEL_REGISTRY); `idforge models pin {name}` "
                                "prints the entry for the files in place")
            elif found[rel] != f.sha256:
                problems.append(f"{rel}: sha256 {found[rel]} does not match the pinned {f.sha256}")
        if missing:
            where = f"{spec.location} (fetched into {root})" if self._remote(spec) else str(root)
            listed = "; ".join(f"{rel} ({spec.files[rel].what})" for rel in missing)
            problems.insert(0, f"{len(missing)} file(s) missing from {where}: {listed}")
        reason = "; ".join(problems) if problems else None
        return VerifyResult(name=name, ok=not problems, reason=reason, sha256=found,
                            missing=tuple(missing), root=root)

    def ensure(self, name: str) -> Path:
        """The verified directory of `name`: a missing tiny preset is copied in, a remote model fetched.

        A tiny preset's shipped files are copied (never built: see `models/presets`) into a
        temporary sibling, checked against the pins there and renamed into place, so concurrent
        workers never see a half-written model. An existing directory is never replaced: a tampered
        preset is refused, not repaired. Raises ModelUnavailable when verification fails.
        """
        spec = self.spec(name)
        root = self.root(name)
        if not root.exists() and spec.tiny and not self._remote(spec):
            self._materialise(spec, root)
        if self._remote(spec):
            self._fetch_missing(spec, root)
        result = self.verify(name)
        if not result.ok:
            raise ModelUnavailable(name, result.reason or "verification failed")
        return root

    def weights_sha256(self, name: str) -> dict[str, str]:
        """Relative path -> sha256 of the verified files, for the manifest."""
        result = self.verify(name)
        if not result.ok:
            raise ModelUnavailable(name, result.reason or "verification failed")
        return result.sha256

    def load(self, name: str, device: Device = "cpu", kind: ModelKind | None = None) -> Any:
        """Load `name` after verifying its files; ModelUnavailable when they do not match the pins."""
        spec = self.spec(name)
        if kind is not None and spec.kind != kind:
            raise ValueError(f"name: {name!r} is a {spec.kind}, not a {kind}")
        result = self.verify(name)
        if not result.ok:
            raise ModelUnavailable(name, result.reason or "verification failed")
        present = {rel for rel in spec.files if (self.root(name) / rel).is_file()}
        return LOADERS[spec.family](self.root(name), spec.config, device, present)

    def pin_entry(self, name: str) -> dict[str, Any]:
        """The registry-file entry pinning the files of `name` that are in place now."""
        spec = self.spec(name)
        root = self.root(name)
        digests = {rel: file_sha256(root / rel) for rel in spec.files if (root / rel).is_file()}
        entry: dict[str, Any] = {"sha256": digests}
        if spec.location is not None:
            entry["location"] = spec.location
        return {"models": {name: entry}}

    @staticmethod
    def _remote(spec: ModelSpec) -> bool:
        return spec.location is not None and spec.location.startswith("s3://")

    def _materialise(self, spec: ModelSpec, root: Path) -> None:
        """Copy the shipped files of tiny preset `spec` to `root`, via a staging directory checked
        against the pins; a shipped file that does not match its pin is never put in place."""
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", dir=root.parent))
        try:
            copied = copy_preset(spec, staging, self.presets)
            wrong = [f"{rel}: sha256 {got} does not match the pinned {spec.files[rel].sha256}"
                     for rel in copied if (got := hash_file(staging / rel)) != spec.files[rel].sha256]
            if wrong:
                raise ModelUnavailable(spec.name, f"shipped preset files in {self.presets / spec.name} "
                                       f"do not match their pins: {'; '.join(wrong)}")
            os.replace(staging, root)  # atomic; fails if another process got there first
        except OSError:
            if not root.exists():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _fetch_missing(self, spec: ModelSpec, root: Path) -> None:
        """Copy each pinned file that is absent locally from the S3 prefix, checking its sha256."""
        assert spec.location is not None
        prefix = spec.location.rstrip("/")
        for rel, f in spec.files.items():
            dest = root / rel
            if dest.is_file():
                continue
            if f.sha256 is None:
                continue  # verify() names the missing pin; an unpinned file is never fetched
            if self.fetch is None:
                raise ModelUnavailable(spec.name, f"{rel}: location {spec.location} is on S3 but this "
                                       "process has no S3 client to fetch it")
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
            os.close(fd)
            tmp = Path(tmp_name)
            try:
                try:
                    self.fetch(f"{prefix}/{rel}", tmp)
                except FileNotFoundError:
                    if f.optional:
                        continue
                    raise ModelUnavailable(spec.name, f"{rel}: not found at {prefix}/{rel} "
                                           f"({f.what})") from None
                got = file_sha256(tmp)
                if got != f.sha256:
                    raise ModelUnavailable(spec.name, f"{rel}: fetched from {prefix}/{rel} with sha256 "
                                           f"{got}, which does not match the pinned {f.sha256}")
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)


# The functions below use the built-in table over one model directory.


def get_spec(name: str) -> ModelSpec:
    """The built-in spec of a registered model; ValueError naming `name` otherwise."""
    return Registry(".").spec(name)


def verify(name: str, model_dir: str | Path) -> VerifyResult:
    """Check that every pinned file of `name` is in `model_dir / name` with its pinned sha256."""
    return Registry(model_dir).verify(name)


def ensure_model(name: str, model_dir: str | Path) -> Path:
    """The verified directory of `name`; a missing tiny preset is copied there first."""
    return Registry(model_dir).ensure(name)


def weights_sha256(name: str, model_dir: str | Path) -> dict[str, str]:
    """Relative path -> sha256 of the verified weight and tokenizer files, for the manifest."""
    return Registry(model_dir).weights_sha256(name)


def load_generator(name: str, model_dir: str | Path, device: Device = "cpu") -> Any:
    """The verified generator `name` from `model_dir / name`, on `device`."""
    return Registry(model_dir).load(name, device, "generator")


def load_embedder(name: str, model_dir: str | Path, device: Device = "cpu") -> Any:
    """The verified embedder `name` from `model_dir / name`, on `device`, in eval mode."""
    return Registry(model_dir).load(name, device, "embedder")
