"""The client commands of `idforge`: serve the API, submit and follow jobs, download, report, manage
keys. `workers/cli.py` adds the commands that need workers or models and is the entry point."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from app.client import ApiError, Client

DEFAULT_URL = "http://127.0.0.1:8000"


def _client(url: str, key: str | None) -> Client:
    key = key or os.environ.get("IDFORGE_API_KEY")
    if not key:
        raise click.UsageError("give --api-key or set IDFORGE_API_KEY")
    return Client(url, key)


@click.group()
def main() -> None:
    """idforge: synthetic face-recognition datasets on demand."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
def serve(host: str, port: int) -> None:
    """Run the HTTP API (uvicorn)."""
    import uvicorn

    from app.logs import setup_logging
    from app.settings import Settings

    settings = Settings()
    setup_logging(settings.log_format, settings.log_level)
    # log_config=None: uvicorn's records go through the handler set up above.
    uvicorn.run("app.api.main:create_app", factory=True, host=host, port=port, log_level=settings.log_level.lower(),
                access_log=False, log_config=None)


def _load_spec(path: str) -> dict[str, Any]:
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    try:
        return json.loads(text)  # type: ignore[no-any-return]
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"{path} is not valid JSON: {e}") from e


@main.command()
@click.argument("spec_file")
@click.option("--url", default=DEFAULT_URL, envvar="IDFORGE_URL", show_default=True)
@click.option("--api-key", default=None)
@click.option("--idempotency-key", default=None)
@click.option("--wait/--no-wait", default=False, help="follow the job until it ends")
@click.option("--timeout", default=3600.0, show_default=True, help="seconds to wait")
def submit(spec_file: str, url: str, api_key: str | None, idempotency_key: str | None, wait: bool,
           timeout: float) -> None:
    """Submit a job spec (a JSON file, or - for stdin). With --wait: exit 0 iff it succeeded."""
    c = _client(url, api_key)
    try:
        job = c.submit(_load_spec(spec_file), idempotency_key=idempotency_key)
    except ApiError as e:
        click.echo(json.dumps(e.problem, indent=1), err=True)
        sys.exit(2)
    click.echo(job["id"])
    if not wait:
        return
    sys.exit(_follow(c, job["id"], timeout))


def _follow(c: Client, job_id: str, timeout: float) -> int:
    def show(job: dict[str, Any]) -> None:
        p = job["progress"]
        total = max(p["images_total"], 1)
        width = 30
        fill = int(width * p["images_done"] / total)
        click.echo(f"\r[{'#' * fill}{'.' * (width - fill)}] {p['images_done']}/{p['images_total']}"
                   f" images  {job['status']}:{job.get('stage') or '-':<20}", nl=False, err=True)

    try:
        job = c.wait(job_id, timeout=timeout, on_update=show)
    except TimeoutError as e:
        click.echo(f"\n{e}", err=True)
        return 124
    click.echo("", err=True)
    if job["status"] != "succeeded":
        click.echo(f"job {job_id} {job['status']}: {json.dumps(job.get('error'))}", err=True)
        return 1
    click.echo(json.dumps(job["result"], indent=1))
    return 0


@main.command()
@click.argument("job_id")
@click.option("--url", default=DEFAULT_URL, envvar="IDFORGE_URL", show_default=True)
@click.option("--api-key", default=None)
def status(job_id: str, url: str, api_key: str | None) -> None:
    """Print a job as JSON."""
    try:
        click.echo(json.dumps(_client(url, api_key).job(job_id), indent=1))
    except ApiError as e:
        click.echo(json.dumps(e.problem, indent=1), err=True)
        sys.exit(2)


@main.command()
@click.argument("job_id")
@click.option("--url", default=DEFAULT_URL, envvar="IDFORGE_URL", show_default=True)
@click.option("--api-key", default=None)
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="wait until every object is gone (`deleted_at` set)")
def delete(job_id: str, url: str, api_key: str | None, wait: bool) -> None:
    """Delete a job's data: every stored object (dataset, report, checkpoints); a live job is
    canceled first. The job's record stays, with `deleted_at`. Needs the `submit` scope."""
    try:
        job = _client(url, api_key).delete(job_id, wait=wait)
    except ApiError as e:
        click.echo(json.dumps(e.problem, indent=1), err=True)
        sys.exit(2)
    if job.get("deleted_at"):
        click.echo(f"{job_id}: deleted at {job['deleted_at']} ({job['status']} job; its record stays)")
    else:
        click.echo(f"{job_id}: deletion requested at {job['deletion_requested_at']}; workers are deleting it")


@main.command("list")
@click.option("--url", default=DEFAULT_URL, envvar="IDFORGE_URL", show_default=True)
@click.option("--api-key", default=None)
@click.option("--status", default=None, help="queued, running, canceling, succeeded, failed or canceled")
@click.option("--metadata", "metadata", multiple=True, metavar="KEY=VALUE",
              help="jobs whose spec.metadata has KEY=VALUE (repeat: all must match)")
@click.option("--created-after", default=None, help="RFC 3339 time, e.g. 2026-12-01T00:00:00Z")
@click.option("--created-before", default=None, help="RFC 3339 time")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
def list_jobs(url: str, api_key: str | None, status: str | None, metadata: tuple[str, ...],
              created_after: str | None, created_before: str | None, as_json: bool) -> None:
    """The team's jobs, newest first, filtered (e.g. `--metadata commit=abc123`)."""
    pairs = {}
    for item in metadata:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--metadata")
        pairs[key] = value
    try:
        for job in _client(url, api_key).jobs(status=status, metadata=pairs, created_after=created_after,
                                               created_before=created_before):
            if as_json:
                click.echo(json.dumps(job))
            else:
                gone = "  deleted" if job.get("deleted_at") else ""
                click.echo(f"{job['id']}  {job['status']:9}  {job['created_at']}  "
                           f"{json.dumps(job['spec'].get('metadata') or {})}{gone}")
    except ApiError as e:
        click.echo(json.dumps(e.problem, indent=1), err=True)
        sys.exit(2)


@main.command()
@click.argument("job_id")
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--url", default=DEFAULT_URL, envvar="IDFORGE_URL", show_default=True)
@click.option("--api-key", default=None)
@click.option("--family", is_flag=True, help="also the jobs it extends, as one dataset: one imagefolder/, "
              "each job's objects under jobs/{id}/, family.json")
def download(job_id: str, out_dir: Path, url: str, api_key: str | None, family: bool) -> None:
    """Download a succeeded job's manifest and files (checksums verified)."""
    try:
        n = _client(url, api_key).download(job_id, out_dir, family=family)
    except ApiError as e:
        click.echo(json.dumps(e.problem, indent=1), err=True)
        sys.exit(2)
    click.echo(f"{n} files and manifest.json in {out_dir}")


@main.command()
@click.argument("job_id")
@click.option("--url", default=DEFAULT_URL, envvar="IDFORGE_URL", show_default=True)
@click.option("--api-key", default=None)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="where to write the report  [default: ./report-JOB_ID]")
@click.option("--open", "open_browser", is_flag=True, help="open report.html in the web browser")
def report(job_id: str, url: str, api_key: str | None, out_dir: Path | None, open_browser: bool) -> None:
    """Download a succeeded job's quality report (HTML, JSON, plots) and print its summary."""
    c = _client(url, api_key)
    out = out_dir or Path(f"report-{job_id}")
    try:
        job = c.job(job_id)
        if job["status"] != "succeeded":
            why = f": {job['error'].get('message')}" if job.get("error") else ""
            raise click.ClickException(f"job {job_id} is {job['status']}{why}; "
                                       "a job has a report once it has succeeded")
        files = c.download_report(job_id, out)
    except ApiError as e:
        click.echo(json.dumps(e.problem, indent=1), err=True)
        sys.exit(2)
    if files is None:
        off = (job.get("spec") or {}).get("quality", {}).get("report") is False
        raise click.ClickException(f"job {job_id} has no quality report" + (
            ": it was submitted with quality.report = false" if off else " in storage"))
    for line in _quality_lines((job.get("result") or {}).get("quality") or {}):
        click.echo(line)
    html = out / "report.html"
    click.echo(f"report: {html if html in files else out}")
    if open_browser:
        import webbrowser

        if html not in files:
            raise click.ClickException(f"job {job_id}'s report has no report.html to open")
        webbrowser.open(html.resolve().as_uri())


def _quality_lines(q: dict[str, Any]) -> list[str]:
    """A few lines of the report summary: each model's EER, FNMR@FMR=1e-3 and label flips, and
    the leakage check."""
    def pct(x: Any) -> str:
        return f"{100 * x:.2f}%" if isinstance(x, int | float) else "n/a"

    if not q:
        return ["the job's result has no quality summary"]
    lines = [f"{q.get('images', '?')} images of {q.get('identities', '?')} identities"]
    for role, m in (q.get("models") or {}).items():
        if m is None:
            lines.append(f"  {role}: not evaluated")
            continue
        lines.append(f"  {role} ({m.get('name')}): EER {pct(m.get('eer'))}, "
                     f"FNMR@FMR=1e-3 {pct((m.get('fnmr_at_fmr') or {}).get('1e-3'))}, "
                     f"label flips {m.get('label_flips', 'n/a')}")
    leak = q.get("leakage")
    lines.append(f"  leakage: {leak['identities']} identities above cosine {leak['threshold']:.3f} to "
                 f"{leak['reference']} (max cosine {leak['max_cosine']:.3f})" if leak
                 else "  leakage: not checked (no reference set)")
    return lines


@main.group()
def keys() -> None:
    """API keys, stored hashed in the service's Redis: a key is shown once, when it is made.

    Keys given in IDFORGE_API_KEYS are listed (and can be revoked) where that variable is set."""


_redis_option = click.option("--redis-url", default=None,
                             help="the service's Redis  [default: IDFORGE_REDIS_URL]")


def _keyring(redis_url: str | None) -> Any:
    import redis

    from app.api.auth import KeyRing
    from app.settings import Settings

    s = Settings()
    client = redis.Redis.from_url(redis_url or s.redis_url, decode_responses=True,
                                  socket_connect_timeout=5, socket_timeout=10)
    return KeyRing(client, s.key_entries)


@keys.command("create")
@click.option("--team", required=True, help="the team the key acts for")
@click.option("--scopes", default="read,submit", show_default=True,
              help="comma-separated, of read, submit (implies read), admin")
@click.option("--name", default="", help="what the key is for (shown in listings)")
@_redis_option
def keys_create(team: str, scopes: str, name: str, redis_url: str | None) -> None:
    """Make a key for TEAM: the key is printed on stdout, once; it is stored only as its sha256."""
    from app.errors import ServiceError

    try:
        key, rec = _keyring(redis_url).create(team, scopes.split(","), name)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e
    except ServiceError as e:
        raise click.ClickException(e.detail) from e
    click.echo(key)
    click.echo(f"made key {rec.id} for team {rec.team} with scopes {','.join(rec.scopes)}; store it "
               "now: it is not shown again", err=True)


@keys.command("list")
@click.option("--team", default=None, help="only this team's keys")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@_redis_option
def keys_list(team: str | None, as_json: bool, redis_url: str | None) -> None:
    """Every key (of TEAM): id, team, scopes, name, when made, where from, revoked or not."""
    from app.errors import ServiceError

    try:
        records = _keyring(redis_url).records(team)
    except ServiceError as e:
        raise click.ClickException(e.detail) from e
    if as_json:
        click.echo(json.dumps([r.public() for r in records], indent=1))
        return
    for r in records:
        state = f"revoked {r.revoked_at}" if r.revoked_at else "active"
        click.echo(f"{r.id}  {r.team:16} {','.join(r.scopes):18} {r.source:5} "
                   f"{r.created_at or '-':20} {state:28} {r.name}")


@keys.command("revoke")
@click.argument("key_id")
@_redis_option
def keys_revoke(key_id: str, redis_url: str | None) -> None:
    """Revoke KEY_ID (as `keys list` shows it): every API process refuses it from now on."""
    from app.errors import ServiceError

    try:
        rec = _keyring(redis_url).revoke(key_id)
    except ServiceError as e:
        raise click.ClickException(e.detail) from e
    if rec is None:
        raise click.ClickException(f"no key {key_id} (keys from IDFORGE_API_KEYS are known only where "
                                   "that variable is set)")
    click.echo(f"{rec.id} of team {rec.team} revoked at {rec.revoked_at}")


if __name__ == "__main__":
    main()
