"""Schemathesis against the live service: every operation of the OpenAPI document, with generated
valid and invalid inputs, sent to a real uvicorn server (real Redis, local storage) with a valid
API key. No response may be a 5xx, and every response must match the document: its status code is
documented, and its content type, headers and body match what is declared for it.

Hypothesis' `max_examples` (FUZZ_EXAMPLES, default 100 per operation) keeps the run short; raise it
for a deeper run: `FUZZ_EXAMPLES=500 pytest tests/api/test_fuzz.py`.
"""

from __future__ import annotations

import copy
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from app.api.main import create_app
from app.servers import RedisServer, free_port
from app.settings import Settings
from tests.conftest import TEAM_KEYS
from tests.servers import Proc, wait_http

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))
AUTH = {"Authorization": "Bearer key-alpha"}
# Why POST /v1/jobs may refuse a spec that matches the schema: rules across fields (method and
# generator pairs, validators), limits, models without verified weights, refused webhook URLs, and
# an Idempotency-Key reused with another body. Any other error type means the schema is wrong.
SPEC_RULES = {"value_error", "assertion_error", "invalid_spec", "incompatible_models", "unknown_model",
              "model_unavailable", "method_unavailable", "over_limit", "webhook_url_refused",
              "idempotency_key_reused", "invalid_exclusion", "invalid_extension", "invalid_preview"}
CASES: Counter[str] = Counter()  # operation -> cases sent
STATUSES: Counter[int] = Counter()


@pytest.fixture(scope="module")
def live_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("fuzz")
    redis = RedisServer(root / "redis").start()
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "IDFORGE_REDIS_URL": redis.url, "IDFORGE_API_KEYS": TEAM_KEYS,
           "IDFORGE_STORAGE_DIR": str(root / "storage"), "IDFORGE_PUBLIC_URL": f"http://127.0.0.1:{port}",
           "IDFORGE_LOG_FORMAT": "json",
           # No worker consumes the queue, and the fuzzer is not throttled: limits are tested elsewhere.
           "IDFORGE_RATE_LIMIT_PER_S": "0", "IDFORGE_MAX_CONCURRENT_JOBS": "0", "IDFORGE_MAX_IMAGES_PER_DAY": "0"}
    api = Proc(["serve", "--port", str(port)], env, root / "api.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz", proc=api)
        # One real job, so that generated ids are not all unknown ones.
        r = httpx.post(f"{url}/v1/jobs", headers=AUTH, json={"identities": 1, "images_per_identity": 1})
        assert r.status_code == 202, r.text
        yield url
    finally:
        api.stop()
        redis.stop()
        total = sum(CASES.values())
        print(f"\nschemathesis: {total} cases over {len(CASES)} operations; statuses {dict(sorted(STATUSES.items()))}")
        for op, n in sorted(CASES.items()):
            print(f"  {n:4d}  {op}")
        assert not (api.log.read_text().count('"level": "ERROR"')), "the API logged errors"


# The document the server serves (checked against the live one below), built without a server so
# that pytest can collect one test per operation.
DOCUMENT = create_app(Settings(api_keys=TEAM_KEYS)).openapi()
# Schemathesis sends the key through the document's bearer scheme: positive cases carry it, and its
# security checks send none or a wrong one and expect a 401.
# A state-dependent refusal of a well-formed request is no bug: 409 (schemathesis's default) and 410,
# the artifacts of a job the fuzzer deleted.
schema = schemathesis.openapi.from_dict(copy.deepcopy(DOCUMENT), config=schemathesis.Config.from_dict(
    {"auth": {"openapi": {"bearer": {"bearer": "key-alpha"}}},
     "checks": {"positive_data_acceptance": {"expected-statuses": [
         "2xx", "3xx", "401", "403", "404", "409", "410", "429", "5xx"]}}}))


@pytest.fixture(autouse=True)
def key_still_works(live_api: str) -> Iterator[None]:
    """The fuzzer's key must survive it (it may revoke keys it made, not its own): otherwise later
    cases would all be 401s and test nothing."""
    yield
    assert httpx.get(f"{live_api}/v1/jobs", headers=AUTH).status_code == 200


def test_the_server_serves_this_document(live_api: str) -> None:
    assert httpx.get(f"{live_api}/openapi.json").json() == DOCUMENT


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_every_operation_conforms(case: Any, live_api: str) -> None:
    op = case.operation.label
    # Rules JSON Schema cannot express make some schema-valid requests a 422: checked below instead.
    lenient = [positive_data_acceptance] if op in ("POST /v1/jobs", "POST /v1/keys") else []
    response = case.call_and_validate(base_url=live_api, excluded_checks=lenient)
    if op == "POST /v1/jobs" and case.meta.generation.mode == GenerationMode.POSITIVE \
            and response.status_code == 422:
        types = {e.get("type") for e in response.json().get("errors", [])}
        assert types and types <= SPEC_RULES, f"a schema-valid spec was refused for its shape: {response.text}"
    CASES[case.operation.label] += 1
    STATUSES[response.status_code] += 1
    assert response.status_code < 500, response.text


# Sequences that follow the document's links: submit a job, then read, cancel, list its events and
# ask for its artifacts, with the same checks on every response.
class JobLifecycle(schema.as_state_machine()):  # type: ignore[misc]
    base_url = ""

    def get_call_kwargs(self, case: Any) -> dict[str, Any]:
        return {"base_url": self.base_url}

    def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
        assert response.status_code < 500, response.text
        CASES[f"linked {case.operation.label}"] += 1
        STATUSES[response.status_code] += 1
        lenient = [positive_data_acceptance] if case.operation.label in ("POST /v1/jobs", "POST /v1/keys") else []
        case.validate_response(response, excluded_checks=lenient, transport_kwargs=kwargs)


def test_job_lifecycles_conform(live_api: str) -> None:
    JobLifecycle.base_url = live_api
    JobLifecycle.TestCase.settings = settings(max_examples=max(10, EXAMPLES // 2), stateful_step_count=6,
                                              deadline=None, derandomize=True,
                                              suppress_health_check=list(HealthCheck))
    JobLifecycle.TestCase().runTest()
