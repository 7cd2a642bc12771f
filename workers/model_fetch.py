"""`idforge models fetch`: a published model's files from their Hugging Face repositories into the
model directory, checked against what the Hub says they are, and the registry pins for them.

An operator's command, run once per model and revision: workers never download anything (they read
the model directory or the operator's S3 prefix, against the pins). The catalogue names each file's
Hub home (`WeightFile.source`: repository, path, commit); a file without one (arcface_torch's
`backbone.pth`, the StyleGAN2 checkpoints) is placed by hand, and a model that needs one is refused
here, naming the file.

For each file: a HEAD of the Hub's `resolve` endpoint gives the commit the revision stands for
(`X-Repo-Commit`) and what the file's bytes are (`X-Linked-Etag`: their sha256 for LFS files; `ETag`:
their git blob id otherwise). The first file of a repository resolves the revision to a commit and
every other file of that repository is taken at that commit, so a branch that moves mid-fetch cannot
mix two commits. `huggingface_hub.hf_hub_download` downloads into a staging directory beside the
model's (retrying a dropped connection from where it stopped, with a Range request), the bytes are
hashed and compared with the Hub's digest, then renamed into place; a rerun after an interrupted
fetch checks the files already in place against the Hub's digests instead of downloading them
again. A file already pinned (built in or in the registry file) with other bytes is refused, never
re-pinned. Last, every placed file is hashed again: bytes that changed between fetch and pin are
refused and nothing is pinned.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.modelspec import HubFile, ModelSpec
from models.registry import Registry, hash_file

COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")  # a git commit or blob id
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

__all__ = ["FetchError", "FetchResult", "FetchedFile", "fetch_model", "parse_revisions", "write_pins"]


class FetchError(Exception):
    """`models fetch` refused or failed; the message names the model and the file, on one line."""


@dataclass(frozen=True)
class FetchedFile:
    rel: str  # path relative to the model's directory
    path: Path  # where it was placed
    source: HubFile  # where it came from; `revision` is the commit it was taken at
    sha256: str  # of its bytes, hashed as they arrived
    downloaded: bool  # False: already in place with the Hub's bytes, so not downloaded again

    def line(self) -> str:
        how = "downloaded" if self.downloaded else "already in place"
        return (f"{self.rel}: {how} from {self.source.repo}@{self.source.revision} "
                f"({self.source.path}), sha256 {self.sha256}")


@dataclass(frozen=True)
class FetchResult:
    name: str  # the model's catalogue name
    root: Path  # its directory
    files: dict[str, FetchedFile]  # relative path -> what was fetched
    location: str | None  # the spec's location, carried into the entry as `models pin` does

    def entry(self) -> dict[str, Any]:
        """The registry-file entry pinning the fetched files, in the form `idforge models pin` prints."""
        entry: dict[str, Any] = {"sha256": {rel: f.sha256 for rel, f in sorted(self.files.items())}}
        if self.location is not None:
            entry["location"] = self.location
        return {"models": {self.name: entry}}


def parse_revisions(spec: ModelSpec, values: Iterable[str]) -> dict[str, str]:
    """`--revision` values -> {repository: revision}. `REPO=REV` names the repository; a bare `REV`
    is accepted when the model's files come from one repository. ValueError naming the value."""
    repos = sorted({f.source.repo for f in spec.files.values() if f.source is not None})
    out: dict[str, str] = {}
    for value in values:
        repo, named, rev = value.partition("=")
        if not named:
            if len(repos) != 1:
                raise ValueError(f"--revision {value!r}: {spec.name} takes files from {len(repos)} "
                                 f"repositories ({', '.join(repos) or 'none'}); write REPO=REV")
            repo, rev = repos[0], value
        if repo not in repos:
            raise ValueError(f"--revision {value!r}: {repo!r} is not a repository of {spec.name}; "
                             f"its repositories: {', '.join(repos) or 'none'}")
        if not rev or repo in out:
            raise ValueError(f"--revision {value!r}: expected one non-empty revision per repository")
        out[repo] = rev
    return out


def fetch_model(registry: Registry, name: str, *, revisions: Mapping[str, str] | None = None,
                endpoint: str | None = None, load: bool = False,
                on_file: Callable[[FetchedFile], None] | None = None) -> FetchResult:
    """Fetch every file of `name` that has a Hub source into `registry.root(name)` and return its pins.

    `revisions` overrides the catalogue's commit per repository; `endpoint` is the Hub's address
    (None: huggingface_hub's, i.e. `HF_ENDPOINT` or huggingface.co); `load` also loads the model once
    on the CPU with the new pins; `on_file` is called as each file is placed. Raises ValueError for
    an unknown model or revision, FetchError for everything refused or failed (nothing is pinned).
    """
    spec = registry.spec(name)
    sources = _sources(spec, revisions or {}, registry.root(name))
    root = registry.root(name)
    staging = root.parent / f".{name}.fetch"
    try:
        fetched = _fetch_files(spec, sources, root, staging, endpoint, on_file)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # holds nothing of use after a run, finished or not
    _check_layout(spec, root)
    if load:
        _load(registry, spec, fetched)
    changed = [f"{rel} (sha256 {f.sha256} when fetched, {now} now)" for rel, f in sorted(fetched.items())
               if (now := hash_file(f.path) if f.path.is_file() else "absent") != f.sha256]
    if changed:
        raise FetchError(f"{name}: file(s) changed between fetch and pin: {'; '.join(changed)}; "
                         "nothing pinned: fetch again")
    return FetchResult(name=name, root=root, files=fetched, location=spec.location)


def _fetch_files(spec: ModelSpec, sources: Mapping[str, HubFile], root: Path, staging: Path,
                 endpoint: str | None, on_file: Callable[[FetchedFile], None] | None) -> dict[str, FetchedFile]:
    """Each file checked against the Hub's digest and any pin held, then renamed into `root`."""
    name = spec.name
    commits: dict[str, str] = {}  # repository -> the commit its files are taken at
    fetched: dict[str, FetchedFile] = {}
    for rel, src in sorted(sources.items()):
        commit, digest = _call(name, src, _metadata, src, commits.get(src.repo, src.revision), endpoint)
        if commits.setdefault(src.repo, commit) != commit:
            raise FetchError(f"{name}: {rel}: {src.repo} answered commit {commit} after "
                             f"{commits[src.repo]}; nothing pinned")
        at = dataclasses.replace(src, revision=commit)
        dest = root / rel
        downloaded = not dest.is_file()
        if downloaded:
            if digest[0] == "sha256":  # an LFS file: a pin it contradicts is refused before the download
                _check_pin(spec, rel, digest[1], None)
            local = _call(name, at, _download, at, staging, endpoint)
            sha = _check(name, rel, at, local, digest, "the bytes downloaded from")
            _check_pin(spec, rel, sha, local)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(local, dest)
        else:
            sha = _check(name, rel, at, dest, digest, f"the file already at {dest} differs from",
                         remove=False)
            _check_pin(spec, rel, sha, None)
        fetched[rel] = FetchedFile(rel=rel, path=dest, source=at, sha256=sha, downloaded=downloaded)
        if on_file is not None:
            on_file(fetched[rel])
    return fetched


def write_pins(path: str | Path, entry: Mapping[str, Any]) -> None:
    """Merge `entry` ({"models": {name: {"sha256": ...}}}) into the registry file at `path` (JSON, or
    YAML for .yaml/.yml; created if absent), keeping its other entries; written to a temporary file
    and renamed. A file the registry file already pins with other bytes is refused (FetchError)."""
    import yaml

    path = Path(path)
    yaml_file = path.suffix in (".yaml", ".yml")
    text = path.read_text("utf-8") if path.exists() else ""
    doc = (yaml.safe_load(text) if yaml_file else json.loads(text) if text.strip() else None) or {}
    if not isinstance(doc, dict) or not isinstance(doc.get("models") or {}, dict):
        raise FetchError(f"{path}: expected a mapping with a 'models' mapping")
    models = doc["models"] = doc.get("models") or {}
    for name, new in entry["models"].items():
        old = dict(models.get(name) or {})
        pins = dict(old.get("sha256") or {})
        clash = [f"{rel} (pinned {pins[rel]}, fetched {sha})" for rel, sha in new["sha256"].items()
                 if rel in pins and str(pins[rel]).lower() != sha]
        if clash:
            raise FetchError(f"{path}: models.{name} already pins other bytes: {'; '.join(clash)}; "
                             "refusing to re-pin (remove the old pin first if the change is intended)")
        old["sha256"] = {**pins, **new["sha256"]}
        if "location" in new:
            old.setdefault("location", new["location"])
        models[name] = old
    text = yaml.safe_dump(doc, sort_keys=False) if yaml_file else json.dumps(doc, indent=2) + "\n"
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _sources(spec: ModelSpec, revisions: Mapping[str, str], root: Path) -> dict[str, HubFile]:
    """The files to fetch, each with its revision; FetchError for a model that cannot be fetched."""
    if spec.tiny:
        raise FetchError(f"{spec.name}: a tiny preset; its files ship with idforge (models/presets) and "
                         "workers copy them into the model directory: nothing to fetch")
    if spec.location is not None and spec.location.startswith("s3://"):
        raise FetchError(f"{spec.name}: the registry file places it at {spec.location}; fetch into a "
                         "model directory and copy the files there, or drop the location")
    homeless = [f"{rel} ({f.what})" for rel, f in sorted(spec.files.items())
                if f.source is None and not f.optional]
    if homeless:
        raise FetchError(f"{spec.name}: {len(homeless)} file(s) have no Hugging Face source, so `models "
                         f"fetch` cannot get them: {'; '.join(homeless)}. Place them by hand in {root} "
                         f"(docs/models.md, \"Placing weights\") and pin them with `idforge models pin "
                         f"{spec.name}`")
    repos = {f.source.repo for f in spec.files.values() if f.source is not None}
    unknown = sorted(set(revisions) - repos)
    if unknown:
        raise ValueError(f"revisions: {unknown} are not repositories of {spec.name}; its repositories: "
                         f"{sorted(repos)}")
    return {rel: dataclasses.replace(f.source, revision=revisions.get(f.source.repo, f.source.revision))
            for rel, f in spec.files.items() if f.source is not None}


def _metadata(src: HubFile, revision: str, endpoint: str | None) -> tuple[str, tuple[str, str]]:
    """(commit, (digest kind, digest)) of `src` at `revision`, from a HEAD of the Hub's resolve URL."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    meta = get_hf_file_metadata(hf_hub_url(src.repo, src.path, revision=revision, endpoint=endpoint),
                                endpoint=endpoint)
    commit = (meta.commit_hash or "").lower()
    if not COMMIT_RE.match(commit):
        raise FetchError(f"{src.repo}/{src.path}@{revision}: the endpoint sent no commit (X-Repo-Commit); "
                         "is HF_ENDPOINT a Hugging Face Hub?")
    etag = (meta.etag or "").lower()
    if SHA256_RE.match(etag):
        return commit, ("sha256", etag)
    if COMMIT_RE.match(etag):
        return commit, ("git blob id", etag)
    raise FetchError(f"{src.repo}/{src.path}@{revision}: the Hub sent no digest of the file (ETag "
                     f"{meta.etag!r} is neither a sha256 nor a git blob id), so its bytes cannot be checked")


def _download(src: HubFile, staging: Path, endpoint: str | None) -> Path:
    """Download `src` at its commit into `staging/<owner--name>/<path>` (huggingface_hub resumes a
    dropped connection with a Range request)."""
    from huggingface_hub import hf_hub_download

    local_dir = staging / src.repo.replace("/", "--")
    return Path(hf_hub_download(src.repo, src.path, revision=src.revision, local_dir=local_dir,
                                endpoint=endpoint))


def _digests(path: Path) -> tuple[str, str]:
    """(sha256, git blob id) of a file's bytes, read once."""
    sha, blob = hashlib.sha256(), hashlib.sha1(usedforsecurity=False)
    blob.update(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
            blob.update(chunk)
    return sha.hexdigest(), blob.hexdigest()


def _check(name: str, rel: str, src: HubFile, path: Path, digest: tuple[str, str], what: str,
           remove: bool = True) -> str:
    """The sha256 of `path` once its bytes are shown to be the Hub's; FetchError (and the staged copy
    removed, so that no later run reuses it) otherwise."""
    sha, blob = _digests(path)
    kind, want = digest
    if (sha if kind == "sha256" else blob) != want:
        if remove:
            path.unlink(missing_ok=True)
        raise FetchError(f"{name}: {rel}: {what} {src.repo}@{src.revision} ({src.path}): the Hub's {kind} "
                         f"is {want}, the bytes' sha256 {sha} (git blob id {blob}); nothing pinned")
    return sha


def _check_pin(spec: ModelSpec, rel: str, sha: str, staged: Path | None) -> None:
    """Refuse bytes that contradict a pin already held (built in, or the operator's registry file)."""
    pinned = spec.files[rel].sha256
    if pinned is not None and pinned != sha:
        if staged is not None:
            staged.unlink(missing_ok=True)
        raise FetchError(f"{spec.name}: {rel}: the registry pins sha256 {pinned} but the Hub's bytes are "
                         f"{sha}; refusing to re-pin (check the revision; remove the old pin first if the "
                         "change is intended)")


def _check_layout(spec: ModelSpec, root: Path) -> None:
    """Every required file in place; JSON configs and safetensors headers parse."""
    missing = sorted(rel for rel in spec.required() if not (root / rel).is_file())
    if missing:
        raise FetchError(f"{spec.name}: still missing from {root} after the fetch: {', '.join(missing)}")
    for rel in sorted(spec.files):
        path = root / rel
        if not path.is_file():
            continue
        try:
            if rel.endswith(".json"):
                json.loads(path.read_text("utf-8"))
            elif rel.endswith(".safetensors"):
                with path.open("rb") as f:
                    (size,) = struct.unpack("<Q", f.read(8))
                    json.loads(f.read(size))
        except (ValueError, struct.error) as e:
            raise FetchError(f"{spec.name}: {rel} does not parse as {Path(rel).suffix[1:]}: {e}") from e


def _load(registry: Registry, spec: ModelSpec, fetched: Mapping[str, FetchedFile]) -> None:
    """Load the model once on the CPU, its fetched files pinned as they will be."""
    files = {rel: dataclasses.replace(f, sha256=fetched[rel].sha256) if rel in fetched else f
             for rel, f in spec.files.items()}
    specs = {**registry.specs, spec.name: dataclasses.replace(spec, files=files)}
    try:
        Registry(registry.model_dir, specs, presets=registry.presets).load(spec.name, "cpu")
    except Exception as e:  # any loader failure is the model's, reported on one line
        raise FetchError(f"{spec.name}: fetched, but does not load: {type(e).__name__}: {e}") from e


def _call(name: str, src: HubFile, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)`, a Hub call, its errors translated to one FetchError line naming the file."""
    import httpx2
    from huggingface_hub import errors

    where = f"{src.repo}@{src.revision} ({src.path})"
    try:
        return fn(*args)
    except errors.OfflineModeIsEnabled:
        raise FetchError("HF_HUB_OFFLINE is set: `models fetch` needs the network; run it with "
                         "HF_HUB_OFFLINE=0") from None
    except errors.GatedRepoError:
        raise FetchError(f"{name}: {src.repo} is gated: accept its terms on the Hub and log in "
                         "(`hf auth login`, or HF_TOKEN)") from None
    except errors.RepositoryNotFoundError:
        raise FetchError(f"{name}: no repository {src.repo} on the Hub (or it is private)") from None
    except errors.RevisionNotFoundError:
        raise FetchError(f"{name}: {src.repo} has no revision {src.revision!r}") from None
    except errors.RemoteEntryNotFoundError:
        raise FetchError(f"{name}: {src.repo}@{src.revision} has no file {src.path}") from None
    except errors.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        raise FetchError(f"{name}: {where}: HTTP {status} from the Hub") from None
    except (httpx2.HTTPError, OSError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise FetchError(f"{name}: {where}: {type(e).__name__}: {first}") from None
