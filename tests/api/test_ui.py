"""The /ui page in headless Chromium against the real API (uvicorn on loopback, real Redis, local
storage), and the artifacts response's report URLs that the page and `idforge report` use.

The browser tests share one seeded API and one browser and run in file order: the last ones move
the running job forward and switch teams.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from app.api.main import create_app
from app.jobstore import JobStore
from app.layout import JobKeys
from app.servers import RedisServer
from app.settings import Settings
from app.storage import LocalStorage
from tests.conftest import TEAM_KEYS
from tests.ui_fixtures import FAILURE, PLOTS, PREFIX, QUALITY, Live, live_api, seed

pytestmark = pytest.mark.integration

A = {"Authorization": "Bearer key-alpha"}


@pytest.fixture(scope="module")
def live(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    # Database 1: the conftest `store` fixture flushes database 0 for other tests.
    with live_api(redis_server.url.rsplit("/", 1)[0] + "/1", tmp_path_factory.mktemp("ui")) as srv:
        yield srv


# ---- the artifacts response ------------------------------------------------------------------

def test_artifacts_have_presigned_report_urls(live: Live) -> None:
    art = httpx.get(f"{live.url}/v1/jobs/{live.jobs['succeeded']}/artifacts", headers=A).json()
    report = art["report"]
    assert set(report["plots"]) == set(PLOTS)
    assert len(art["files"]) == 1 and art["manifest_url"]  # the rest of the response is unchanged
    urls = {"report.html": report["html"], "report.json": report["json"],
            **{f"plots/{n}": u for n, u in report["plots"].items()}}
    for rel, url in urls.items():
        r = httpx.get(url)  # presigned: no API key
        assert r.status_code == 200 and r.content == live.files[rel], rel
    assert httpx.get(report["html"].replace("sig=", "sig=0")).status_code == 401
    none = httpx.get(f"{live.url}/v1/jobs/{live.jobs['no_report']}/artifacts", headers=A).json()
    assert none["report"] is None
    other = httpx.get(f"{live.url}/v1/jobs/{live.jobs['succeeded']}/artifacts",
                      headers={"Authorization": "Bearer key-beta"})
    assert other.status_code == 404


def test_artifacts_report_lists_only_the_objects_that_exist(redis_server: RedisServer, store: JobStore,
                                                            tmp_path: Path) -> None:
    settings = Settings(redis_url=redis_server.url, api_keys=TEAM_KEYS, secret_key="s", storage_dir=tmp_path, s3_prefix=PREFIX,
                        public_url="http://testserver")
    storage = LocalStorage(tmp_path, signing_key=settings.signing_key, base_url="http://testserver")
    jobs, files = seed(store, storage)
    jid = jobs["succeeded"]
    keys = JobKeys.for_job(PREFIX, jid)
    (tmp_path / keys.key("report/plots/scores_evaluator.png")).unlink()
    (tmp_path / keys.key("report/report.json")).unlink()
    with TestClient(create_app(settings, store=store, storage=storage)) as c:
        report = c.get(f"/v1/jobs/{jid}/artifacts", headers=A).json()["report"]
        assert report["json"] is None and report["html"].startswith("http://testserver/v1/files/")
        assert set(report["plots"]) == set(PLOTS) - {"scores_evaluator.png"}
        r = c.get(report["plots"]["roc.png"].removeprefix("http://testserver"))
        assert r.status_code == 200 and r.content == files["plots/roc.png"]
        assert r.headers["content-type"] == "image/png"
        page = c.get(report["html"].removeprefix("http://testserver"))
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        policy = csp(page.headers["content-security-policy"])  # no script runs on the API's origin
        assert policy["default-src"] == ["'none'"] and "sandbox" in policy and "script-src" not in policy
        (tmp_path / keys.key("report/report.html")).unlink()  # plots alone are not a report
        assert c.get(f"/v1/jobs/{jid}/artifacts", headers=A).json()["report"] is None


# ---- the page's headers ----------------------------------------------------------------------

def csp(header: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for part in filter(None, (p.strip() for p in header.split(";"))):
        name, *values = part.split()
        out[name] = values
    return out


def test_ui_is_served_without_a_key_with_a_strict_csp(live: Live) -> None:
    r = httpx.get(f"{live.url}/ui")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    policy = csp(r.headers["content-security-policy"])
    assert policy["default-src"] == ["'none'"]
    assert policy["script-src"] == ["'self'"] and policy["style-src"] == ["'self'"]
    assert policy["connect-src"] == ["'self'"] and policy["frame-ancestors"] == ["'none'"]
    assert policy["img-src"] == ["'self'", live.url]  # local storage: URLs point at the public URL
    assert "unsafe" not in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "<script" not in r.text.replace('<script src="ui/ui.js" defer></script>', "")  # no inline code
    assert "style=" not in r.text and "<style" not in r.text
    js = httpx.get(f"{live.url}/ui/ui.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "innerHTML" not in js.text and "textContent" in js.text
    assert httpx.get(f"{live.url}/ui/ui.css").headers["content-type"].startswith("text/css")
    assert httpx.get(f"{live.url}/ui/ui.html").status_code == 404
    assert httpx.get(f"{live.url}/ui/..%2Fapi.py").status_code == 404


def test_csp_allows_images_from_the_s3_download_endpoint(tmp_path: Path) -> None:
    settings = Settings(storage="s3", s3_bucket="datasets", s3_endpoint_url="http://minio:9000",
                        s3_public_endpoint_url="https://downloads.example.test",
                        s3_access_key_id="AKIDEXAMPLE", s3_secret_access_key="secret",
                        public_url="https://idforge.example.test", storage_dir=tmp_path)
    with TestClient(create_app(settings)) as c:
        policy = csp(c.get("/ui").headers["content-security-policy"])
    # Presigned URLs are signed for the public endpoint; the internal one never reaches a browser.
    assert policy["img-src"] == ["'self'", "https://downloads.example.test",
                                 "https://idforge.example.test"]


# ---- the page in Chromium --------------------------------------------------------------------

def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: the /ui test must run; .ci/run installs chromium)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed")
    exe = next(filter(None, (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome"))), None)
    driver_exe = shutil.which("chromedriver")
    if not exe or not driver_exe:
        _unavailable("headless Chromium needs `chromium` and `chromedriver` (Debian: chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = exe  # type: ignore[assignment]
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_exe), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver: Any, cond: Callable[[Any], Any], what: str, timeout: float = 15) -> Any:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout).until(cond)
    except TimeoutException:
        msg = driver.execute_script("return document.getElementById('message').textContent")
        raise AssertionError(f"timed out waiting for {what}; page message: {msg!r}") from None


def by_css(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)  # type: ignore[no-any-return]


def sign_in(driver: Any, url: str, key: str) -> None:
    driver.get(f"{url}/ui")
    driver.execute_script("sessionStorage.clear()")
    driver.get(f"{url}/ui")
    field = wait(driver, lambda d: next((e for e in by_css(d, "#key") if e.is_displayed()), None),
                 "the key form")
    field.send_keys(key)
    by_css(driver, "#key-form button[type=submit]")[0].click()


def rows(driver: Any) -> dict[str, dict[str, str]]:
    """The job table: id -> the text of each cell by its class, read in one script (the table is
    redrawn every refresh, so element handles go stale)."""
    got = driver.execute_script(
        "return [...document.querySelectorAll('#job-rows tr')].map(tr => [tr.dataset.jobId, "
        "Object.fromEntries([...tr.cells].map(c => [c.classList[0] || 'id', c.textContent]))]);")
    return {jid: cells for jid, cells in got}


def open_job(driver: Any, job_id: str) -> None:
    """Click the job's id in the table (again, if a refresh redrew the row under the click)."""
    from selenium.common.exceptions import StaleElementReferenceException

    for _ in range(5):
        try:
            by_css(driver, f"tr[data-job-id={job_id}] button.job-link")[0].click()
            return
        except StaleElementReferenceException:
            continue
    raise AssertionError(f"could not click job {job_id}")


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def test_page_lists_the_teams_jobs(browser: Any, live: Live) -> None:
    sign_in(browser, live.url, "key-alpha")
    wait(browser, lambda d: len(by_css(d, "#job-rows tr")) == 4, "alpha's four jobs")
    table = rows(browser)
    j = live.jobs
    assert list(table) == [j["running"], j["failed"], j["succeeded"], j["no_report"]]  # newest first
    assert j["beta"] not in table and j["beta"] not in browser.page_source
    assert {jid: r["status"] for jid, r in table.items()} == {
        j["running"]: "running", j["failed"]: "failed", j["succeeded"]: "succeeded",
        j["no_report"]: "succeeded"}
    running = table[j["running"]]
    assert running["progress"] == "24/80 images" and running["stage"] == "rendering"
    bar = by_css(browser, f"tr[data-job-id={j['running']}] progress")[0]
    assert (bar.get_attribute("value"), bar.get_attribute("max")) == ("24", "80")
    assert table[j["succeeded"]]["progress"] == "120/120 images"
    # The failure message is shown as text, markup and all: nothing in it is parsed as HTML.
    assert table[j["failed"]]["error"] == f"{FAILURE['code']}: {FAILURE['message']}"
    assert by_css(browser, "#job-rows b") == [] and by_css(browser, "#job-rows script") == []
    created = live.store.get(j["failed"])["created_at"]  # type: ignore[index]
    assert table[j["failed"]]["created"] == created.replace("T", " ")
    assert browser.execute_script("return sessionStorage.getItem('idforge.apiKey')") == "key-alpha"


def test_selecting_a_job_shows_its_summary_plots_and_report(browser: Any, live: Live) -> None:
    jid = live.jobs["succeeded"]
    open_job(browser, jid)
    wait(browser, lambda d: by_css(d, "#summary"), "the summary table")
    assert by_css(browser, f"tr[data-job-id={jid}]")[0].get_attribute("class") == "selected"
    cells = {(c.get_attribute("data-model"), c.get_attribute("data-metric")): c.text
             for c in by_css(browser, "#summary td")}
    for model in ("job", "evaluator"):
        m = QUALITY["models"][model]
        f = m["fnmr_at_fmr"]
        assert cells[(model, "eer")] == pct(m["eer"])
        assert cells[(model, "fnmr_1e-3")] == pct(f["1e-3"])
        assert cells[(model, "fnmr_1e-4")] == (pct(f["1e-4"]) if f["1e-4"] is not None else "\u2014")
        assert cells[(model, "min_centre_angle")] == f"{m['min_centre_angle_deg']:.1f}\u00b0"
        assert cells[(model, "close_identities")] == str(m["close_identities"])
        assert cells[(model, "label_flips")] == str(m["label_flips"])
    assert cells[("job", "eer")] == "3.12%" and cells[("evaluator", "fnmr_1e-4")] == "\u2014"
    heads = [h.text for h in by_css(browser, "#summary thead th")]
    assert heads[1:] == ["Job model (iresnet-tiny)", "Evaluator (sface)"]
    fields = {d.get_attribute("data-field"): d.text for d in by_css(browser, "#dataset dd")}
    c = QUALITY["counts"]
    assert fields["images"] == "120" and fields["identities"] == "10"
    assert fields["alignment_failures"] == str(QUALITY["alignment_failures"])
    assert fields["counts"] == (f"requested {c['requested']}, rendered {c['rendered']}, alignment failures "
                                f"{c['alignment_failures']}, filtered {c['filtered']}, topped up {c['topped_up']}")
    assert fields["leakage"] == "1 identities above cosine 0.400 to lfw-sample (max cosine 0.432)"

    loaded = wait(browser, lambda d: d.execute_script(
        "const imgs = [...document.querySelectorAll('#plots figure')];"
        "return imgs.length && imgs.every(f => f.querySelector('img').complete) && "
        "imgs.map(f => [f.dataset.plot, f.querySelector('img').naturalWidth, "
        "f.querySelector('img').naturalHeight]);"), "the plots to load")
    assert {name: (w, h) for name, w, h in loaded} == PLOTS  # every plot decoded at its size
    assert [name for name, _, _ in loaded][:2] == ["scores_job.png", "scores_evaluator.png"]

    href = by_css(browser, "#report-html")[0].get_attribute("href")
    r = httpx.get(href)
    assert r.status_code == 200 and r.content == live.files["report.html"]
    csp_errors = [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
    assert csp_errors == []  # the page works under its own policy


def test_jobs_without_a_report(browser: Any, live: Live) -> None:
    open_job(browser, live.jobs["no_report"])
    note = wait(browser, lambda d: by_css(d, "#no-report"), "the no-report note")[0]
    assert "quality.report = false" in note.text
    assert by_css(browser, "#summary") == [] and by_css(browser, "#plots") == []
    open_job(browser, live.jobs["failed"])
    err = wait(browser, lambda d: by_css(d, "#detail-error"), "the failed job's error")[0]
    assert err.text == f"{FAILURE['code']}: {FAILURE['message']}"
    assert by_css(browser, "#detail b") == []
    open_job(browser, live.jobs["running"])
    wait(browser, lambda d: "is running" in d.find_element("id", "detail-body").text, "the running note")


def test_page_refreshes_while_a_job_runs(browser: Any, live: Live) -> None:
    jid = live.jobs["running"]
    live.store.set_progress(jid, "shard00001", identities=3, images=24)
    wait(browser, lambda d: rows(d)[jid]["progress"] == "48/80 images", "progress to reach 48/80")
    live.store.set_progress(jid, "shard00002", identities=4, images=32)
    live.store.transition(jid, "failed", error={"code": "worker_lost", "message": "the worker died"})
    wait(browser, lambda d: rows(d)[jid]["status"] == "failed", "the running job to end")
    assert rows(browser)[jid]["error"] == "worker_lost: the worker died"
    # The selected job's detail follows its new status.
    wait(browser, lambda d: by_css(d, "#detail-error"), "the detail to show the failure")


def test_wrong_key_shows_an_error_and_another_team_sees_only_its_jobs(browser: Any, live: Live) -> None:
    sign_in(browser, live.url, "not-a-key")
    msg = wait(browser, lambda d: next((e for e in by_css(d, "#message") if e.is_displayed()), None),
               "the error message")
    assert "API key" in msg.text and "401" in msg.text
    assert by_css(browser, "#job-rows tr") == [] and by_css(browser, "#key")[0].is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('idforge.apiKey')") is None

    by_css(browser, "#key")[0].send_keys("key-beta")
    by_css(browser, "#key-form button[type=submit]")[0].click()
    wait(browser, lambda d: len(by_css(d, "#job-rows tr")) == 1, "beta's job")
    assert list(rows(browser)) == [live.jobs["beta"]]
    assert not by_css(browser, "#message")[0].is_displayed()
    by_css(browser, "#forget")[0].click()
    assert by_css(browser, "#key")[0].is_displayed() and by_css(browser, "#job-rows tr") == []
