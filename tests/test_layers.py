"""Layering: the API process never imports torch, models or workers; the catalogue the API
validates against names exactly the models the registry can load."""

from __future__ import annotations

import json
import subprocess
import sys

from app import catalog

PROBE = r"""
import json, sys
from fastapi.testclient import TestClient
from app.api.main import create_app
from app.settings import Settings
import app.cli  # the CLI module too: its heavy commands import lazily
settings = Settings(redis_url=sys.argv[1], api_keys="alpha:k", storage_dir=sys.argv[2])
with TestClient(create_app(settings)) as c:
    codes = [c.post("/v1/jobs", json={"identities": 2, "images_per_identity": 1},
                    headers={"Authorization": "Bearer k"}).status_code,
             c.get("/v1/models", headers={"Authorization": "Bearer k"}).status_code,
             c.get("/readyz").status_code]
heavy = sorted(m for m in sys.modules
               if m.split(".")[0] in {"torch", "models", "workers", "diffusers", "transformers",
                                      "numpy"})
print(json.dumps({"codes": codes, "heavy": heavy}))
"""


def test_api_process_never_imports_torch(redis_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = subprocess.run([sys.executable, "-c", PROBE, redis_server.url, str(tmp_path)],
                         capture_output=True, text=True, timeout=120, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["codes"] == [202, 200, 200], got  # the probe really served requests
    assert got["heavy"] == [], f"the API process imported {got['heavy']}"


def test_catalogue_matches_registry() -> None:
    from models import registry

    assert set(catalog.CATALOG) == set(registry.SPECS)
    for name, entry in catalog.CATALOG.items():
        spec = registry.get_spec(name)
        assert (spec.kind, spec.family, spec.tiny) == (entry.kind, entry.family, entry.tiny)
