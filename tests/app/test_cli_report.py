"""`idforge report JOB` against the real API (uvicorn on loopback, real Redis, local storage), with
jobs seeded through the JobStore and the storage."""

from __future__ import annotations

import webbrowser
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from app.servers import RedisServer
from tests.ui_fixtures import FAILURE, PLOTS, Live, live_api
from workers.cli import main

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def live(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    # Database 2: the conftest `store` fixture flushes database 0 for other tests.
    with live_api(redis_server.url.rsplit("/", 1)[0] + "/2", tmp_path_factory.mktemp("report")) as srv:
        yield srv


def run(live: Live, *args: str, key: str = "key-alpha") -> Result:
    return CliRunner().invoke(main, ["report", *args, "--url", live.url, "--api-key", key])


def test_report_downloads_the_files_and_prints_the_summary(live: Live, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []

    def browser_open(url: str, *args: object, **kwargs: object) -> bool:  # no desktop browser in tests
        opened.append(url)
        return True

    monkeypatch.setattr(webbrowser, "open", browser_open)
    out = tmp_path / "rep"
    res = run(live, live.jobs["succeeded"], "--out", str(out), "--open")
    assert res.exit_code == 0, res.output
    got = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert got == live.files  # report.html, report.json and every plot, byte for byte
    assert set(got) == {"report.html", "report.json", *(f"plots/{n}" for n in PLOTS)}
    text = res.output
    assert "120 images of 10 identities" in text
    assert "job (iresnet-tiny): EER 3.12%, FNMR@FMR=1e-3 8.71%, label flips 1" in text
    assert "evaluator (sface): EER 4.57%, FNMR@FMR=1e-3 10.23%, label flips 3" in text
    assert "leakage: 1 identities above cosine 0.400 to lfw-sample (max cosine 0.432)" in text
    assert f"report: {out / 'report.html'}" in text
    assert opened == [(out / "report.html").resolve().as_uri()]


def test_report_default_directory(live: Live, tmp_path: Path) -> None:
    jid = live.jobs["succeeded"]
    runner = CliRunner()
    with runner.isolated_filesystem(temp_dir=tmp_path) as cwd:
        res = runner.invoke(main, ["report", jid, "--url", live.url, "--api-key", "key-alpha"])
        assert res.exit_code == 0, res.output
        assert (Path(cwd) / f"report-{jid}" / "report.html").read_bytes() == live.files["report.html"]
        assert (Path(cwd) / f"report-{jid}" / "plots" / "roc.png").is_file()


def test_jobs_without_a_report_exit_non_zero_with_a_reason(live: Live, tmp_path: Path) -> None:
    res = run(live, live.jobs["no_report"], "--out", str(tmp_path / "a"))
    assert res.exit_code == 1
    assert "has no quality report: it was submitted with quality.report = false" in res.output
    assert not (tmp_path / "a").exists()

    res = run(live, live.jobs["failed"], "--out", str(tmp_path / "b"))
    assert res.exit_code == 1
    assert f"is failed: {FAILURE['message']}" in res.output

    res = run(live, live.jobs["running"], "--out", str(tmp_path / "c"))
    assert res.exit_code == 1 and "is running" in res.output


def test_other_teams_jobs_and_bad_keys_are_refused(live: Live, tmp_path: Path) -> None:
    res = run(live, live.jobs["beta"], "--out", str(tmp_path / "x"))
    assert res.exit_code == 2 and "not_found" in res.output
    res = run(live, live.jobs["succeeded"], "--out", str(tmp_path / "y"), key="key-beta")
    assert res.exit_code == 2 and "not_found" in res.output
    res = run(live, live.jobs["succeeded"], "--out", str(tmp_path / "z"), key="wrong")
    assert res.exit_code == 2 and "unauthorized" in res.output
    assert not any((tmp_path / d).exists() for d in "xyz")
