"""The `idforge` entry point: the client commands of `app/cli.py` (submit, status, download,
report, keys, serve) and the commands that need the workers or the models: worker, up, generate,
reproduce, models, covariates. Heavy imports stay inside the command bodies, so `idforge submit`
starts without torch."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from app.cli import DEFAULT_URL, _client, _load_spec, main
from app.client import ApiError, Client, fetch_to_file
from app.credentials import new_secret


@main.command()
@click.option("--queues", default="gpu,cpu", show_default=True, help="queues to consume")
@click.option("--concurrency", default=1, show_default=True, help="processes (one per GPU)")
@click.option("--name", default=None, help="worker node name")
def worker(queues: str, concurrency: int, name: str | None) -> None:
    """Run a Celery worker (models load once per process, after the fork)."""
    from app.logs import resolve_format, setup_logging
    from app.settings import Settings
    from workers.celery_app import WORKER_QUEUES_ENV, create_celery

    os.environ[WORKER_QUEUES_ENV] = queues  # the pool processes' heartbeats name them
    settings = Settings()
    setup_logging(settings.log_format, settings.log_level)
    app = create_celery(settings)
    argv = ["worker", "-Q", queues, "-c", str(concurrency), "--pool", "prefork",
            "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"]
    if name:
        argv += ["-n", name]
    if resolve_format(settings.log_format) == "json":
        argv = ["--quiet", *argv]  # no start-up banner: the output is JSON lines only
    app.worker_main(argv)


@main.command()
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path(".idforge"),
              show_default=True, help="Redis data, storage and models")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
@click.option("--redis-port", default=0, help="0 = a free port")
def up(data_dir: Path, host: str, port: int, redis_port: int) -> None:
    """Everything on one machine: Redis, a Celery worker and the API, with local storage."""
    import uvicorn

    from app.logs import setup_logging
    from app.servers import RedisServer, stop_group
    from app.settings import Settings

    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    env = _embedded_env(data_dir, host, port)
    redis_srv = RedisServer(data_dir / "redis", redis_port or None).start()
    env["IDFORGE_REDIS_URL"] = redis_srv.url
    os.environ.update(env)
    worker_log = open(data_dir / "worker.log", "ab")
    worker_proc = subprocess.Popen([sys.executable, "-m", "workers.cli", "worker"], env=os.environ.copy(),
                                   stdout=worker_log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    from app.credentials import parse_key_entries

    key = next((e.plaintext for e in parse_key_entries(env["IDFORGE_API_KEYS"]) if e.plaintext),
               "(IDFORGE_API_KEYS holds only digests)")
    url = env["IDFORGE_PUBLIC_URL"]
    click.echo(f"idforge is up at {url}\n  API key: {key}\n  data:    {data_dir}\n"
               f"  redis:   {redis_srv.url}  (for `idforge keys ... --redis-url`)\n"
               f"  worker log: {data_dir / 'worker.log'}\n"
               f"  webhooks are signed with the secret in {data_dir / 'webhook_secret'}\n"
               f"  try: curl -X POST {url}/v1/jobs -H 'Authorization: Bearer {key}' "
               "-H 'Content-Type: application/json' -d '{\"identities\": 4, "
               "\"images_per_identity\": 2}'", err=False)
    sys.stdout.flush()
    settings = Settings()
    setup_logging(settings.log_format, settings.log_level)
    try:
        _serve_until_signal(uvicorn.Config("app.api.main:create_app", factory=True, host=host, port=port,
                                           log_level="warning", log_config=None))
    finally:
        stop_group(worker_proc)  # warm shutdown: the current batch finishes
        redis_srv.stop()


def _serve_until_signal(config: Any) -> None:
    """Run uvicorn, but let SIGTERM/SIGINT end `serve()` normally (uvicorn would re-raise the
    signal after shutting down, killing this process before it stops the worker and Redis)."""
    import contextlib

    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Any:
            yield

    server = Server(config)

    def stop(signum: int, frame: Any) -> None:
        server.should_exit = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.run()


def _embedded_env(data_dir: Path, host: str, port: int) -> dict[str, str]:
    """Settings for the embedded default; the API key and signing secret persist in data_dir."""
    def persisted(name: str, make: Any) -> str:
        p = data_dir / name
        if not p.exists():
            p.write_text(make())
            p.chmod(0o600)
        return p.read_text().strip()

    keys = os.environ.get("IDFORGE_API_KEYS") or persisted(
        "api_keys", lambda: f"local:idf_{secrets.token_urlsafe(24)}")
    return {
        "IDFORGE_API_KEYS": keys,
        "IDFORGE_SECRET_KEY": persisted("secret_key", lambda: secrets.token_hex(32)),
        "IDFORGE_WEBHOOK_SECRET": os.environ.get("IDFORGE_WEBHOOK_SECRET") or persisted(
            "webhook_secret", new_secret),
        "IDFORGE_STORAGE": "local",
        "IDFORGE_STORAGE_DIR": str(data_dir / "storage"),
        "IDFORGE_MODEL_DIR": os.environ.get("IDFORGE_MODEL_DIR", str(data_dir / "models")),
        "IDFORGE_PUBLIC_URL": f"http://{host}:{port}",
    }


@main.command()
@click.argument("spec_file")
@click.argument("out_dir", type=click.Path(path_type=Path))
def generate(spec_file: str, out_dir: Path) -> None:
    """Run a spec in-process into OUT_DIR (no Redis, no broker, no API)."""
    from pydantic import ValidationError

    from app.spec import JobSpec, SpecError
    from workers.local import generate as run

    try:
        spec = JobSpec.model_validate(_load_spec(spec_file))
    except ValidationError as e:
        raise click.BadParameter(str(e)) from e
    t0 = time.perf_counter()
    try:
        manifest = run(spec, out_dir, on_progress=lambda d, t: click.echo(
            f"\r{d}/{t} images", nl=False, err=True))
    except SpecError as e:
        raise click.BadParameter(f"{e.field}: {e.message}") from e
    click.echo("", err=True)
    click.echo(f"{manifest['counts']['images']} images in {out_dir} "
               f"({time.perf_counter() - t0:.1f} s); manifest: {out_dir / 'manifest.json'}")


@main.command()
@click.argument("job")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="where to render (default ./reproduce-JOB)")
@click.option("--original", "original_dir", type=click.Path(file_okay=False, exists=True, path_type=Path),
              default=None, help="the job's dataset directory (an `idforge download`), to measure images "
              "that differ against  [default: the directory of a manifest.json JOB; for a job id, the "
              "images that differ are fetched from the service]")
@click.option("--min-cosine", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
              help="the embedding cosine at or above which an image that is not byte-identical still "
              "counts as reproduced  [default: 0.95]")
@click.option("--json", "as_json", is_flag=True, help="print the comparison as JSON")
@click.option("--show", default=50, show_default=True, help="per-image lines to print, worst first")
@click.option("--url", default=DEFAULT_URL, envvar="IDFORGE_URL", show_default=True)
@click.option("--api-key", default=None)
@click.option("--skip-weight-check", is_flag=True,
              help="run even when local weights differ from the job's (the bytes will differ)")
def reproduce(job: str, out_dir: Path | None, original_dir: Path | None, min_cosine: float | None,
              as_json: bool, show: int, url: str, api_key: str | None, skip_weight_check: bool) -> None:
    """Re-run JOB from its manifest on this machine and compare the dataset with the job's.

    JOB is a job id (its manifest is fetched from the service) or a manifest.json file (or its
    directory). Every image and dataset object is compared with the manifest's sha256. When this
    platform differs from the one the manifest records (CPU instruction set, GPU, library versions,
    threads, deterministic flags) or an image is not byte-identical, each image is also measured
    against the job's copy: its largest pixel difference (0-255) and the cosine of the two images'
    embeddings under the job's own FR model. One verdict ends the report:

    \b
      identical   every image and object byte-identical (exit 0)
      equivalent  not identical, but every image's cosine >= --min-cosine (default 0.95:
                  the same picture up to float drift; other images of an identity score
                  lower) (exit 0)
      differs     an image below it, missing or not comparable, or an object missing (exit 1)
    """
    import tempfile

    import httpx

    from app import dataset_index
    from app.layout import INDEX
    from workers.reproduce import (
        DEFAULT_MIN_COSINE,
        ListingMissing,
        WeightsDiffer,
        directory_originals,
        directory_rows,
    )
    from workers.reproduce import reproduce as run

    path = Path(job)
    if path.is_dir():
        path = path / "manifest.json"
    tmp = tempfile.TemporaryDirectory(prefix="idforge-reproduce-")
    excluded = None
    if path.is_file():
        manifest = json.loads(path.read_text())
        root = original_dir or path.parent
        originals = directory_originals(root)
        theirs = directory_rows(root, manifest)
    else:
        try:
            client = _client(url, api_key)
            art = client.artifacts(job, limit=1)
        except ApiError as e:
            raise click.ClickException(str(e)) from e
        manifest = httpx.get(art["manifest_url"], timeout=60).raise_for_status().json()
        index_root = Path(original_dir) if original_dir else Path(tmp.name)
        if dataset_index.inline_files(manifest) is None and not original_dir:
            obj = next((o for o in art.get("objects", []) if o["path"] == INDEX), None)
            if obj is None:
                raise click.ClickException(f"job {job} lists no {INDEX}")
            with httpx.Client(timeout=60) as http:  # streamed to a file, checked against its digest
                fetch_to_file(http, obj["url"], index_root / INDEX, obj["sha256"])
        theirs = directory_rows(index_root, manifest)
        originals = directory_originals(original_dir) if original_dir else _service_originals(
            client, job, manifest)
        excluded = _service_excluded(client, manifest)
    out = out_dir or Path(f"reproduce-{manifest.get('job_id', 'job')}")
    own = original_dir or (path.parent if path.is_file() else None)
    if own is not None and out.resolve() == own.resolve():
        raise click.ClickException(f"--out {out} is the job's own dataset: reproduce into another directory")
    try:
        result = run(manifest, out, check=not skip_weight_check, originals=originals, theirs=theirs,
                     check_originals=original_dir is not None or path.is_file(),
                     min_cosine=DEFAULT_MIN_COSINE if min_cosine is None else min_cosine, excluded=excluded,
                     on_progress=lambda d, t: click.echo(f"\r{d}/{t} images", nl=False, err=True))
    except WeightsDiffer as e:
        raise click.ClickException(f"{e} (--skip-weight-check runs anyway)") from e
    except ListingMissing as e:
        raise click.ClickException(f"{e} (--original DIR names a copy of the job's dataset)") from e
    click.echo("", err=True)
    if as_json:
        click.echo(json.dumps({**result.to_json(), "out": str(out)}, indent=1))
    else:
        for line in _reproduce_lines(result, out, show):
            click.echo(line)
    sys.exit(0 if result.verdict in ("identical", "equivalent") else 1)


def _service_excluded(client: Client, manifest: dict[str, Any]) -> Any:
    """The identities the job's `sampler.exclude` named, the excluded jobs' fetched through the API
    (their data must not have been deleted), the reference sets from this machine's model directory;
    None when it excluded nothing."""
    import httpx
    from safetensors.torch import load as st_load

    from app.layout import IDENTITIES
    from app.settings import Settings
    from app.spec import JobSpec
    from workers.exclusion import build_excluded

    spec = JobSpec.model_validate(manifest["spec"])
    if not spec.sampler.exclude:
        return None

    def job_identities(job_id: str) -> Any:
        try:
            objects = client.artifacts(job_id, limit=1).get("objects", [])
        except ApiError as e:
            raise click.ClickException(f"the job excluded job {job_id}, whose identities cannot be read: {e}") from e
        obj = next((o for o in objects if o["path"] == IDENTITIES), None)
        if obj is None:
            raise click.ClickException(f"the job excluded job {job_id}, which lists no {IDENTITIES}")
        return st_load(httpx.get(obj["url"], timeout=120).raise_for_status().content)["embeddings"]

    return build_excluded(spec, job_identities, Settings().model_dir)


def _service_originals(client: Client, job_id: str, manifest: dict[str, Any]) -> Any:
    """The job's copy of an image, through the service's presigned URLs: the artifacts pages are
    walked forward once, a page at a time, as `measure` asks for images in the job's order (the
    loose file's URL; the bytes of a tar member by a Range request; a RecordIO record by ranged
    reads of train.rec). None when the service has no such image."""
    import httpx

    from app import dataset_index

    def entries() -> Iterator[dict[str, Any]]:
        after = None
        while True:
            art = client.artifacts(job_id, limit=1000, **({"after": after} if after else {}))
            yield from art["files"]
            if not art["has_more"]:
                return
            after = art["next"]

    walk = entries()
    held: list[dict[str, Any]] = []  # the entry read past, at most one

    def fetch(row: dict[str, Any]) -> bytes | None:
        key = (row["identity"], row["sample"])
        while True:
            f = held.pop() if held else next(walk, None)
            if f is None:
                return None
            at = (f["identity"], f["sample"])
            if at > key:
                held.append(f)
                return None
            if at == key:
                break

        def ranged(start: int, length: int) -> bytes:
            r = httpx.get(f["url"], headers={"Range": f"bytes={start}-{start + length - 1}"}, timeout=60)
            r.raise_for_status()
            return r.content[:length] if r.status_code == 206 else r.content[start:start + length]

        try:
            if f.get("path"):
                r = httpx.get(f["url"], timeout=60)
                return r.content if r.status_code == 200 else None
            if f.get("tar_offset") is not None:
                return ranged(int(f["tar_offset"]), int(f["size"]))
            if f.get("record_offset") is not None:
                return dataset_index.read_record(ranged, int(f["record_offset"]))
        except httpx.HTTPError:
            return None
        return None
    return fetch


def _reproduce_lines(result: Any, out: Path, show: int) -> list[str]:
    """The text report: versions, platforms, counts, per-image figures (worst first), the verdict."""
    lines = []
    theirs, ours = result.code_version
    if theirs != ours:
        lines.append(f"note: the job ran idforge {theirs}; this is {ours}")
    diffs = result.platform_differences
    if diffs is None:
        lines.append("platform: the job's manifest does not record one")
    elif diffs:
        lines.append(f"platform: differs from the job's in {len(diffs)} field(s):")
        lines += [f"  {d}" for d in diffs]
    else:
        lines.append("platform: the same as the job's")
    lines.append(f"images: {result.images_identical}/{result.images} byte-identical; dataset objects: "
                 f"{result.objects_identical}/{result.objects} byte-identical; in {out}")
    if result.figures_reported:
        rank = {"missing": 0, "extra": 0, "differs": 1, "equivalent": 2, "identical": 3}
        rows = sorted(result.per_image, key=lambda r: (
            rank[r.status], r.cosine if r.cosine is not None else -2.0, -(r.max_pixel_diff or 0)))
        lines += [f"  {r.line()}" for r in rows[:show]]
        if len(rows) > show:
            lines.append(f"  ... and {len(rows) - show} more images (--show N, or --json for every one)")
    lines += [f"  {line}" for line in result.objects_differing]
    n = result.counts()
    worst, low = result.worst_pixel_diff(), result.lowest_cosine()
    lines.append(f"summary: {result.images} images: {n['identical']} byte-identical, {n['equivalent']} "
                 f"equivalent, {n['differs']} differ, {n['missing']} missing, {n['extra']} extra; "
                 f"worst max pixel diff {'n/a' if worst is None else worst}; min cosine "
                 f"{'n/a' if low is None else f'{low:.6f}'} (threshold {result.min_cosine})")
    verdict = result.verdict
    if verdict == "differs":
        failing = [r.path for r in result.failing]
        missing_objects = [d.rsplit(":", 1)[0] for d in result.objects_differing if d.endswith(": missing")]
        named = failing[:10] + (["..."] if len(failing) > 10 else []) + missing_objects
        lines.append(f"verdict: differs ({len(failing)} image(s) below cosine {result.min_cosine}, missing, "
                     f"extra or not comparable; {len(missing_objects)} object(s) missing: {', '.join(named)})")
    else:
        lines.append(f"verdict: {verdict}")
    return lines


@main.group()
def models() -> None:
    """Inspect the model registry, fetch published weights, verify weights in place, print their pins."""


@models.command("list")
def models_list() -> None:
    """Every registered model and whether its files are in place and match their pins."""
    from app.settings import Settings
    from workers.runtime import model_registry

    reg = model_registry(Settings())
    for name in sorted(reg.specs):
        spec = reg.spec(name)
        v = reg.verify(name)
        state = "ok" if v.ok else ("buildable" if spec.build and v.missing else "unavailable")
        click.echo(f"{name:24} {spec.kind:9} {spec.family:9} {state:11} {reg.root(name)}")
        if state == "unavailable":
            click.echo(f"    {v.reason}")


@models.command("pin")
@click.argument("name")
def models_pin(name: str) -> None:
    """Print the registry-file entry pinning NAME's files as they are in place now.

    Check the files' provenance first: a pin says "these bytes and no others".
    """
    from app.settings import Settings
    from workers.runtime import model_registry

    reg = model_registry(Settings())
    try:
        entry = reg.pin_entry(name)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e
    missing = sorted(set(reg.spec(name).required()) - set(entry["models"][name]["sha256"]))
    if missing:
        raise click.ClickException(f"{name}: files missing from {reg.root(name)}: {', '.join(missing)}")
    click.echo(json.dumps(entry, indent=2))


@models.command("verify")
@click.argument("names", nargs=-1)
def models_verify(names: tuple[str, ...]) -> None:
    """Fetch or build, then verify NAMES (default: all); exit 1 if any is unavailable."""
    from app.settings import Settings
    from models.modelspec import ModelUnavailable
    from workers.runtime import model_registry

    reg = model_registry(Settings())
    bad = 0
    for name in names or tuple(sorted(reg.specs)):
        try:
            reg.ensure(name)
            click.echo(f"{name}: ok")
        except (ModelUnavailable, ValueError) as e:
            bad += 1
            click.echo(f"{name}: {e}", err=True)
    sys.exit(1 if bad else 0)


@models.command("fetch")
@click.argument("name")
@click.option("--revision", "revisions", multiple=True, metavar="[REPO=]REV",
              help="take the files of REPO at REV (a commit, tag or branch) instead of the catalogue's "
              "commit; a bare REV when NAME's files come from one repository; repeatable")
@click.option("--write-registry", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="merge the pins into this registry file (JSON, or YAML for .yaml/.yml; created if "
              "absent) instead of printing them")
@click.option("--endpoint", envvar="HF_ENDPOINT", default=None,
              help="the Hub's address  [default: $HF_ENDPOINT, else huggingface.co]")
@click.option("--load", "check_load", is_flag=True, help="also load the model once, on the CPU")
def models_fetch(name: str, revisions: tuple[str, ...], write_registry: Path | None, endpoint: str | None,
                 check_load: bool) -> None:
    """Download NAME's published files from Hugging Face into the model directory and pin them.

    Each file is checked against the digest the Hub gives for it and renamed into
    IDFORGE_MODEL_DIR/NAME; last, each is hashed again, and the registry entry pinning them is
    printed (or merged into --write-registry). A pin that differs from one already held is refused.
    Run it where the weights should live; workers never download anything.
    """
    from app.settings import Settings
    from models.registry import Registry, load_overrides
    from workers.model_fetch import FetchError, fetch_model, parse_revisions, write_pins
    from workers.runtime import model_registry

    reg = model_registry(Settings())
    try:
        revs = parse_revisions(reg.spec(name), revisions)
        if write_registry is not None and write_registry.exists():  # its pins are checked too
            reg = Registry(reg.model_dir, load_overrides(write_registry, reg.specs), presets=reg.presets)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e
    try:
        result = fetch_model(reg, name, revisions=revs, endpoint=endpoint, load=check_load,
                             on_file=lambda f: click.echo(f.line(), err=True))
        if write_registry is not None:
            write_pins(write_registry, result.entry())
    except (FetchError, OSError) as e:  # OSError: the model directory or the registry file
        raise click.ClickException(str(e)) from e
    if write_registry is None:
        click.echo(json.dumps(result.entry(), indent=2))
    else:
        click.echo(f"pinned {len(result.files)} file(s) of {name} in {write_registry}", err=True)


@main.group()
def covariates() -> None:
    """DisCo's covariate directions (pose, illumination, expression) in a generator's latent space."""


@covariates.command("fit")
@click.argument("input_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("output_file", type=click.Path(dir_okay=False, path_type=Path))
def covariates_fit(input_file: Path, output_file: Path) -> None:
    """Fit one linear SVM per covariate on labelled latents (INPUT_FILE, format in
    docs/covariates.md) and write the directions and scales to OUTPUT_FILE (safetensors).

    Place the output as `covariates.safetensors` in the generator's model directory and pin it.
    """
    from models.sampling.covariates import fit_from_file

    try:
        fitted = fit_from_file(input_file)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="INPUT_FILE") from e
    fitted.save(output_file)
    for name, scale in zip(fitted.names, fitted.scales.tolist(), strict=True):
        click.echo(f"{name}: scale {scale:.4f}")
    click.echo(f"{len(fitted.names)} directions in {fitted.directions.shape[1]}-d -> {output_file}")


if __name__ == "__main__":
    main()
