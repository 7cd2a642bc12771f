"""`idforge models fetch` against a local server that answers the way the Hub's file endpoints do.

`FakeHub` holds repositories as commits of files. `HEAD|GET /{repo}/resolve/{revision}/{path}`
resolves the revision (a commit or a branch) and answers a small text file itself (`ETag`: its git
blob id) and an LFS file (anything else) with a 302 to a second server, its "CDN", carrying
`X-Linked-Etag` (the sha256) and `X-Linked-Size`; both carry `X-Repo-Commit`, and errors carry the
Hub's `X-Error-Code`. The CDN serves blobs by sha256 with Range support, and can be told to send other
bytes than the blob's, or to drop the connection part-way once. The repositories hold the tiny
presets' shipped files, so the pins a fetch prints must equal the pins idforge ships: the bytes went
through exactly. huggingface_hub reads HF_HUB_OFFLINE at import, so in-process tests switch its
constant off for the test only; the subprocess test sets HF_HUB_OFFLINE=0 in that process's env.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import torch
import yaml
from click.testing import CliRunner

from models.modelspec import HubFile, ModelSpec
from models.presets import PRESETS_DIR
from models.registry import Registry, hash_file, load_overrides
from models.zoo import ARC2FACE_HUB, SPECS
from workers.cli import main
from workers.model_fetch import FetchError, fetch_model, parse_revisions, write_pins

ROOT = Path(__file__).resolve().parents[2]
REPO = "idforge-tests/iresnet-tiny"  # serves the iresnet-tiny preset's files under the same paths
TINY = SPECS["iresnet-tiny"]
ONNX_PIN = SPECS["arcface-onnx-tiny"].files["model.onnx"].sha256


class FakeHub:
    """Two loopback HTTP servers: the Hub's resolve endpoint and the CDN its LFS files redirect to."""

    def __init__(self) -> None:
        self.commits: dict[str, dict[str, dict[str, bytes]]] = {}  # repo -> commit -> path -> bytes
        self.refs: dict[str, dict[str, str]] = {}  # repo -> branch -> commit
        self.served: dict[str, bytes] = {}  # sha256 -> the bytes the CDN sends for it
        self.drop_once: dict[str, int] = {}  # sha256 -> bytes sent before the connection drops, once
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self._lock = threading.Lock()
        self._servers = [ThreadingHTTPServer(("127.0.0.1", 0), self._handler(cdn)) for cdn in (False, True)]
        for s in self._servers:
            s.daemon_threads = True
            threading.Thread(target=s.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_address[1]}"

    def close(self) -> None:
        for s in self._servers:
            s.shutdown()
            s.server_close()

    def add(self, repo: str, files: dict[str, bytes], commit: str | None = None,
            branches: tuple[str, ...] = ("main",)) -> str:
        """A commit of `files` to `repo`, which `branches` then point at; returns its id."""
        content = b"".join(k.encode() + hashlib.sha256(v).digest() for k, v in sorted(files.items()))
        commit = commit or hashlib.sha1(repo.encode() + content).hexdigest()
        self.commits.setdefault(repo, {})[commit] = dict(files)
        self.refs.setdefault(repo, {}).update({b: commit for b in branches})
        for data in files.values():
            self.served[hashlib.sha256(data).hexdigest()] = data
        return commit

    def requests(self, method: str, pattern: str) -> list[tuple[str, str, str | None]]:
        return [r for r in self.log if r[0] == method and re.search(pattern, r[1])]

    def _handler(self, cdn: bool) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_HEAD(self) -> None:
                self._serve(head=True)

            def do_GET(self) -> None:
                self._serve(head=False)

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, headers: dict[str, str], body: bytes = b"", head: bool = False,
                      length: int | None = None) -> None:
                self.send_response(status)
                for k, v in {**headers, "Content-Length": str(len(body) if length is None else length)}.items():
                    self.send_header(k, v)
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _serve(self, head: bool) -> None:
                path = urlsplit(self.path).path
                with hub._lock:
                    hub.log.append((self.command, path, self.headers.get("Range")))
                if cdn:
                    self._blob(path.removeprefix("/blobs/"), head)
                else:
                    self._resolve(path, head)

            def _resolve(self, path: str, head: bool) -> None:
                parts = [unquote(p) for p in path.split("/")]
                if len(parts) < 6 or parts[3] != "resolve":
                    return self._send(404, {"X-Error-Code": "RepoNotFound"})
                repo, rev, file = f"{parts[1]}/{parts[2]}", parts[4], "/".join(parts[5:])
                if repo not in hub.commits:
                    return self._send(404, {"X-Error-Code": "RepoNotFound"})
                commit = rev if rev in hub.commits[repo] else hub.refs[repo].get(rev)
                if commit is None:
                    return self._send(404, {"X-Error-Code": "RevisionNotFound"})
                data = hub.commits[repo][commit].get(file)
                if data is None:
                    return self._send(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit})
                if file.endswith((".json", ".txt")):  # kept in git: the ETag is the git blob id
                    blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
                    return self._send(200, {"ETag": f'"{blob}"', "X-Repo-Commit": commit}, data, head)
                sha = hashlib.sha256(data).hexdigest()  # LFS: a redirect to the CDN
                cdn_url = f"http://127.0.0.1:{hub._servers[1].server_address[1]}/blobs/{sha}"
                self._send(302, {"Location": cdn_url, "X-Repo-Commit": commit, "ETag": f'"{sha}"',
                                 "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data))})

            def _blob(self, sha: str, head: bool) -> None:
                data = hub.served.get(sha)
                if data is None:
                    return self._send(404, {})
                m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if m:
                    start = int(m.group(1))
                    rng = f"bytes {start}-{len(data) - 1}/{len(data)}"
                    return self._send(206, {"Content-Range": rng}, data[start:], head)
                cut = None if head else hub.drop_once.pop(sha, None)
                if cut is not None:  # announce the whole file, send part of it, hang up
                    self._send(200, {}, data[:cut], length=len(data))
                    self.close_connection = True
                    return None
                self._send(200, {}, data, head)

        return Handler


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # this test only
    server = FakeHub()
    yield server
    server.close()


def _tiny_files() -> dict[str, bytes]:
    return {rel: (PRESETS_DIR / "iresnet-tiny" / rel).read_bytes() for rel in TINY.files}


def _hub_specs(revision: str) -> dict[str, ModelSpec]:
    """The catalogue plus `iresnet-hub`: the tiny iResNet as a published model, unpinned, from REPO."""
    files = {rel: dataclasses.replace(f, sha256=None, source=HubFile(REPO, rel, revision))
             for rel, f in TINY.files.items()}
    spec = dataclasses.replace(TINY, name="iresnet-hub", tiny=False, build=None, files=files)
    return {**SPECS, spec.name: spec}


def _faces(n: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (n, 112, 112, 3), generator=torch.Generator().manual_seed(0),
                         dtype=torch.uint8)


def test_round_trip_places_the_exact_bytes_pins_them_and_loads(hub: FakeHub, tmp_path: Path,
                                                                model_dir: Path) -> None:
    commit = hub.add(REPO, _tiny_files())
    specs = _hub_specs(commit)
    models = tmp_path / "models"
    placed: list[str] = []
    result = fetch_model(Registry(models, specs), "iresnet-hub", endpoint=hub.endpoint,
                         on_file=lambda f: placed.append(f.rel))

    assert placed == ["config.json", "model.safetensors"]
    pins = result.entry()["models"]["iresnet-hub"]["sha256"]
    assert pins == {rel: f.sha256 for rel, f in TINY.files.items()}  # the shipped pins: exact bytes
    assert {hash_file(models / "iresnet-hub" / rel) for rel in pins} == set(pins.values())
    assert all(f.source.revision == commit and f.downloaded for f in result.files.values())
    assert hub.requests("HEAD", "/resolve/.*/config.json$") and hub.requests("GET", "^/blobs/")
    assert not (models / ".iresnet-hub.fetch").exists()  # the staging directory is gone

    registry_file = tmp_path / "registry.yaml"  # merged into an operator's file, its entries kept
    registry_file.write_text(yaml.safe_dump({"models": {"arcface-r34": {"sha256": {"backbone.pth": "ab" * 32}}}}))
    write_pins(registry_file, result.entry())
    doc = yaml.safe_load(registry_file.read_text())
    assert doc["models"]["arcface-r34"]["sha256"]["backbone.pth"] == "ab" * 32
    assert doc["models"]["iresnet-hub"] == {"sha256": pins}
    other = {"models": {"iresnet-hub": {"sha256": {**pins, "config.json": "cd" * 32}}}}
    with pytest.raises(FetchError, match="already pins other bytes: config.json"):
        write_pins(registry_file, other)
    assert yaml.safe_load(registry_file.read_text()) == doc

    fetched = Registry(models, load_overrides(registry_file, specs)).load("iresnet-hub", kind="embedder")
    shipped_reg = Registry(model_dir)
    shipped_reg.ensure("iresnet-tiny")  # the preset as idforge ships it, for comparison
    shipped = shipped_reg.load("iresnet-tiny", kind="embedder")
    faces = _faces()
    emb = fetched.embed_images(faces)  # [2, 512]
    assert emb.shape == (2, 512) and torch.allclose(emb.norm(dim=1), torch.ones(2))
    assert torch.equal(emb, shipped.embed_images(faces))


def test_a_dropped_connection_resumes_with_a_range_request(hub: FakeHub, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    # huggingface_hub writes whole chunks (10 MiB by default) and resumes after the last one written:
    # 64 KiB chunks let a 6.7 MB file be cut after three of them.
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 1 << 16)
    files = _tiny_files()
    commit = hub.add(REPO, files)
    sha = hashlib.sha256(files["model.safetensors"]).hexdigest()
    hub.drop_once[sha] = 200_000
    result = fetch_model(Registry(tmp_path, _hub_specs(commit)), "iresnet-hub", endpoint=hub.endpoint)
    assert result.files["model.safetensors"].sha256 == TINY.files["model.safetensors"].sha256
    assert [r[2] for r in hub.requests("GET", f"^/blobs/{sha}$")] == [None, f"bytes={3 << 16}-"]


def test_an_interrupted_fetch_completes_on_a_second_run(hub: FakeHub, tmp_path: Path) -> None:
    commit = hub.add(REPO, _tiny_files())
    reg = Registry(tmp_path, _hub_specs(commit))

    class Interrupted(Exception):
        pass

    def stop(f: Any) -> None:
        raise Interrupted(f.rel)

    with pytest.raises(Interrupted, match="config.json"):
        fetch_model(reg, "iresnet-hub", endpoint=hub.endpoint, on_file=stop)
    assert (tmp_path / "iresnet-hub" / "config.json").is_file()
    assert not (tmp_path / "iresnet-hub" / "model.safetensors").exists()

    result = fetch_model(reg, "iresnet-hub", endpoint=hub.endpoint)
    assert not result.files["config.json"].downloaded and result.files["model.safetensors"].downloaded
    assert result.entry()["models"]["iresnet-hub"]["sha256"] == {rel: f.sha256 for rel, f in TINY.files.items()}
    assert len(hub.requests("GET", "/config.json$")) == 1  # the file in place was checked, not fetched again


def test_bytes_other_than_the_hubs_digest_are_refused(hub: FakeHub, tmp_path: Path) -> None:
    files = _tiny_files()
    commit = hub.add(REPO, files)
    sha = hashlib.sha256(files["model.safetensors"]).hexdigest()
    tampered = bytearray(files["model.safetensors"])
    tampered[-1] ^= 1
    hub.served[sha] = bytes(tampered)  # the CDN sends other bytes than X-Linked-Etag says
    with pytest.raises(FetchError, match=rf"model.safetensors: the bytes downloaded .* sha256 is {sha}"):
        fetch_model(Registry(tmp_path, _hub_specs(commit)), "iresnet-hub", endpoint=hub.endpoint)
    assert not (tmp_path / "iresnet-hub" / "model.safetensors").exists()
    assert not list((tmp_path / ".iresnet-hub.fetch").rglob("model.safetensors"))  # not kept for reuse


def test_bytes_that_change_between_fetch_and_pin_are_refused(hub: FakeHub, tmp_path: Path) -> None:
    commit = hub.add(REPO, _tiny_files())

    def tamper(f: Any) -> None:  # someone rewrites the placed file before the pins are taken
        if f.rel == "config.json":
            f.path.write_bytes(f.path.read_bytes().replace(b"512", b"256"))

    with pytest.raises(FetchError, match="changed between fetch and pin: config.json") as e:
        fetch_model(Registry(tmp_path, _hub_specs(commit)), "iresnet-hub", endpoint=hub.endpoint,
                    on_file=tamper)
    assert TINY.files["config.json"].sha256 in str(e.value) and "nothing pinned" in str(e.value)


def test_revision_is_passed_through_and_pins_one_commit(hub: FakeHub, tmp_path: Path) -> None:
    old = hub.add(REPO, _tiny_files(), branches=("main",))
    new = hub.add(REPO, {**_tiny_files(), "config.json": b'{"note": "later"}\n'}, branches=("release",))
    reg = Registry(tmp_path, _hub_specs(old))
    result = fetch_model(reg, "iresnet-hub", revisions={REPO: "release"}, endpoint=hub.endpoint)
    assert {f.source.revision for f in result.files.values()} == {new}
    first, *rest = [r[1] for r in hub.log if r[0] == "HEAD"]
    assert "/resolve/release/" in first and all(f"/resolve/{new}/" in p for p in rest)

    with pytest.raises(ValueError, match="not repositories of iresnet-hub"):
        fetch_model(reg, "iresnet-hub", revisions={"someone/else": "main"}, endpoint=hub.endpoint)
    with pytest.raises(FetchError, match="has no revision 'v9'"):
        fetch_model(reg, "iresnet-hub", revisions={REPO: "v9"}, endpoint=hub.endpoint)


def test_hub_and_network_errors_are_one_line_naming_the_file(hub: FakeHub, tmp_path: Path) -> None:
    commit = hub.add(REPO, {"config.json": _tiny_files()["config.json"]})  # model.safetensors absent
    specs = _hub_specs(commit)
    with pytest.raises(FetchError, match=rf"^iresnet-hub: {REPO}@{commit} has no file model.safetensors$"):
        fetch_model(Registry(tmp_path, specs), "iresnet-hub", endpoint=hub.endpoint)
    elsewhere = {rel: dataclasses.replace(f, source=HubFile("someone/else", rel, "main"))
                 for rel, f in specs["iresnet-hub"].files.items()}
    moved = {**specs, "iresnet-hub": dataclasses.replace(specs["iresnet-hub"], files=elsewhere)}
    with pytest.raises(FetchError, match=r"^iresnet-hub: no repository someone/else on the Hub"):
        fetch_model(Registry(tmp_path, moved), "iresnet-hub", endpoint=hub.endpoint)
    with pytest.raises(FetchError, match=r"^iresnet-hub: .*\(config.json\): ConnectError: [^\n]*$"):
        fetch_model(Registry(tmp_path, specs), "iresnet-hub", endpoint="http://127.0.0.1:9")  # no listener
    assert not (tmp_path / "iresnet-hub" / "model.safetensors").exists()


def test_parse_revisions_names_the_repository_when_there_are_several() -> None:
    assert parse_revisions(SPECS["arcface-onnx"], ["main"]) == {ARC2FACE_HUB[0]: "main"}
    arc2face = SPECS["arc2face"]
    assert parse_revisions(arc2face, [f"{ARC2FACE_HUB[0]}=abc"]) == {ARC2FACE_HUB[0]: "abc"}
    with pytest.raises(ValueError, match="from 3 repositories"):
        parse_revisions(arc2face, ["main"])
    with pytest.raises(ValueError, match="not a repository of arc2face"):
        parse_revisions(arc2face, ["someone/else=main"])


def _cli(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["models", "fetch", *args], env=env)
    return result.exit_code, result.output


def test_models_without_a_hub_source_tiny_presets_and_unknown_names_are_refused(tmp_path: Path) -> None:
    env = {"IDFORGE_MODEL_DIR": str(tmp_path), "HF_ENDPOINT": "http://127.0.0.1:9"}  # never reached
    code, out = _cli(["arcface-r100"], env)
    assert code == 1 and "backbone.pth" in out and "no Hugging Face source" in out and "by hand" in out
    code, out = _cli(["stylegan2-ffhq-256"], env)
    assert code == 1 and "stylegan2.pt" in out and "covariates" not in out  # optional files are skipped
    code, out = _cli(["iresnet-tiny"], env)
    assert code == 1 and "tiny preset" in out
    code, out = _cli(["no-such-model"], env)
    assert code == 2 and "unknown model" in out
    code, out = _cli(["arc2face", "--revision", "main"], env)
    assert code == 2 and "REPO=REV" in out
    assert list(tmp_path.iterdir()) == []


def test_a_pin_that_differs_from_the_registry_file_is_refused(hub: FakeHub, tmp_path: Path) -> None:
    onnx = (PRESETS_DIR / "arcface-onnx-tiny" / "model.onnx").read_bytes()
    hub.add(ARC2FACE_HUB[0], {"arcface.onnx": onnx}, commit=ARC2FACE_HUB[1])
    registry_file = tmp_path / "registry.json"
    registry_file.write_text(json.dumps({"models": {"arcface-onnx": {"sha256": {"arcface.onnx": "0" * 64}}}}))
    before = registry_file.read_bytes()
    env = {"IDFORGE_MODEL_DIR": str(tmp_path / "models"), "HF_ENDPOINT": hub.endpoint}
    for args, extra in ((["--write-registry", str(registry_file)], {}),
                        ([], {"IDFORGE_MODEL_REGISTRY": str(registry_file)})):
        code, out = _cli(["arcface-onnx", *args], {**env, **extra})
        assert code == 1 and "arcface.onnx: the registry pins sha256 0000" in out and "refusing to re-pin" in out
        assert ONNX_PIN in out
    assert registry_file.read_bytes() == before
    assert not (tmp_path / "models" / "arcface-onnx" / "arcface.onnx").exists()
    assert not hub.requests("GET", "^/blobs/")  # the Hub's sha256 contradicted the pin: not downloaded


def test_cli_round_trip_through_hf_endpoint(hub: FakeHub, tmp_path: Path) -> None:
    """The operator's path, in its own process: HF_ENDPOINT and HF_HUB_OFFLINE=0 in the environment,
    the catalogue's own arcface-onnx at its pinned commit, pins merged into a registry file."""
    onnx = (PRESETS_DIR / "arcface-onnx-tiny" / "model.onnx").read_bytes()
    hub.add(ARC2FACE_HUB[0], {"arcface.onnx": onnx}, commit=ARC2FACE_HUB[1])
    models, registry_file = tmp_path / "models", tmp_path / "registry.yaml"
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "IDFORGE_MODEL_DIR": str(models)}
    env.pop("IDFORGE_MODEL_REGISTRY", None)
    out = subprocess.run([sys.executable, "-m", "workers.cli", "models", "fetch", "arcface-onnx",
                          "--write-registry", str(registry_file)],
                         check=False, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"arcface.onnx: downloaded from {ARC2FACE_HUB[0]}@{ARC2FACE_HUB[1]}" in out.stderr
    assert hub.requests("HEAD", f"^/{ARC2FACE_HUB[0]}/resolve/{ARC2FACE_HUB[1]}/arcface.onnx$")
    assert yaml.safe_load(registry_file.read_text()) == {"models": {"arcface-onnx": {"sha256": {"arcface.onnx": ONNX_PIN}}}}

    embedder = Registry(models, load_overrides(registry_file)).load("arcface-onnx", kind="embedder")
    emb = embedder.embed_images(_faces())  # [2, D]
    assert emb.shape[0] == 2 and torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)

    code, printed = _cli(["arcface-onnx", "--revision", "main", "--load"],  # in place: checked, loaded, printed
                         {"IDFORGE_MODEL_DIR": str(models), "HF_ENDPOINT": hub.endpoint})
    assert code == 0 and "already in place" in printed
    assert json.loads(printed[printed.index("{"):]) == {"models": {"arcface-onnx": {"sha256": {"arcface.onnx": ONNX_PIN}}}}
    assert hub.requests("HEAD", f"^/{ARC2FACE_HUB[0]}/resolve/main/arcface.onnx$")
