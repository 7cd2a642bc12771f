"""Static checks of the deployment files: Dockerfile, .dockerignore, docker-compose.yml.

No Docker engine is needed: the compose file is validated against the Compose Specification schema
(check-jsonschema's vendored copy, offline) and both files are parsed for the properties that matter.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml  # PyYAML: present through the dev extra (moto -> responses) and the worker extra

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

APP_SERVICES = ("api", "worker-cpu", "worker-gpu")
FINAL_STAGES = {"api", "worker-cpu", "worker-gpu"}
REQUIRED_SECRETS = ("IDFORGE_API_KEYS", "IDFORGE_SECRET_KEY", "IDFORGE_S3_SECRET_ACCESS_KEY",
                    "IDFORGE_WEBHOOK_SECRET", "MINIO_ROOT_PASSWORD")
REQUIRED_FORM = re.compile(r"^\$\{[A-Z][A-Z0-9_]*:\?[^}]+\}$")


# --------------------------------------------------------------------------------------- helpers

def _check_jsonschema() -> str:
    exe = Path(sys.executable).parent / "check-jsonschema"
    if exe.exists():
        return str(exe)
    found = shutil.which("check-jsonschema")
    if not found:
        pytest.fail("check-jsonschema not installed (it is in the `dev` extra)")
    return found


def _validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_check_jsonschema(), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True, text=True, timeout=60,
    )


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


def _duration_s(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", str(text))
    assert parts and "".join(n + u for n, u in parts) == str(text), f"bad duration {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def _default_of(value: str) -> str:
    """`${VAR:-default}` -> default; a literal stays as it is."""
    m = re.fullmatch(r"\$\{[A-Z0-9_]+:?-([^}]*)\}", value)
    return m.group(1) if m else value


class Stage:
    def __init__(self, base: str, name: str | None):
        self.base, self.name = base, name
        self.instructions: list[tuple[str, str]] = []  # (KEYWORD, arguments)


def _parse_dockerfile(text: str) -> dict[str, Stage]:
    """Stages by name (or index), each with its instructions; continuations joined, comments dropped."""
    logical: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # comment lines inside a continuation are skipped by Docker
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    assert not buf, "Dockerfile ends in a line continuation"

    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for inst in logical:
        keyword, _, args = inst.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--platform")]
            name = words[2].lower() if len(words) >= 3 and words[1].upper() == "AS" else None
            current = Stage(words[0], name)
            stages[name or str(len(stages))] = current
        elif current is not None:
            current.instructions.append((keyword, args))
    return stages


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return _parse_dockerfile(DOCKERFILE.read_text())


def _chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and the stages it is built FROM, base first."""
    out: list[Stage] = []
    while name in stages:
        stage = stages[name]
        assert stage not in out, f"FROM cycle at {name}"
        out.insert(0, stage)
        name = stage.base.lower()
    return out


def _copy_sources(stage: Stage) -> set[str]:
    return {m.group(1).lower() for k, a in stage.instructions if k == "COPY"
            for m in [re.search(r"--from=(\S+)", a)] if m}


def _instructions(stages: dict[str, Stage], name: str, keyword: str) -> list[str]:
    return [a for s in _chain(stages, name) for k, a in s.instructions if k == keyword]


def _env(stages: dict[str, Stage], name: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in _instructions(stages, name, "ENV"):
        for tok in shlex.split(args):
            key, sep, value = tok.partition("=")
            if sep:
                env[key] = value
    return env


# ------------------------------------------------------------------------------ compose: schema

def test_compose_file_validates_against_the_compose_spec():
    proc = _validate(COMPOSE)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("broken", [
    "services:\n  api:\n    ports: 5\n",
    "services:\n  api:\n    image: idforge/api\n    depends_on:\n      redis:\n        condition: when_it_feels_like_it\n",
    "services:\n  worker-gpu:\n    image: x\n    profiles: gpu\n",
    "services:\n  worker-gpu:\n    image: x\n    deploy: {resources: {reservations: {devices: [{driver: nvidia, capabilities: gpu}]}}}\n",
    "services:\n  api:\n    imag: idforge/api\n",
])
def test_the_validator_rejects_a_broken_compose_file(tmp_path, broken):
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(broken)
    proc = _validate(bad)
    assert proc.returncode != 0, f"check-jsonschema accepted:\n{broken}\n{proc.stdout}"


# ---------------------------------------------------------------------------- compose: content

def test_redis_persists_with_aof_and_has_a_healthcheck(services):
    redis = services["redis"]
    assert str(redis["image"]).startswith("redis:7")
    cmd = redis["command"]
    cmd = shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]
    assert "--appendonly" in cmd and cmd[cmd.index("--appendonly") + 1] == "yes"
    assert any(str(v).split(":")[1] == "/data" for v in redis["volumes"]), redis["volumes"]
    assert "redis-cli" in redis["healthcheck"]["test"] and "ping" in redis["healthcheck"]["test"]


def test_minio_setup_creates_the_bucket_once_minio_is_healthy(services):
    assert "healthcheck" in services["minio"]
    setup = services["minio-setup"]
    assert setup["depends_on"]["minio"]["condition"] == "service_healthy"
    assert setup.get("restart", "no") == "no"
    assert "mc mb" in " ".join(map(str, setup["command"]))


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_wait_for_redis_and_the_bucket(services, name):
    deps = services[name]["depends_on"]
    assert deps["redis"]["condition"] == "service_healthy"
    assert deps["minio-setup"]["condition"] == "service_completed_successfully"


def test_api_builds_the_api_target_serves_8000_and_checks_healthz(services):
    api = services["api"]
    assert api["build"]["target"] == "api"
    assert api["command"][:1] == ["serve"] and "0.0.0.0" in api["command"]
    assert any(str(p).endswith(":8000") for p in api["ports"])
    assert "/healthz" in " ".join(api["healthcheck"]["test"])


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_run_in_production_on_redis_and_s3(services, name):
    env = services[name]["environment"]
    assert env["IDFORGE_ENVIRONMENT"] == "production"
    assert env["IDFORGE_STORAGE"] == "s3"
    assert _default_of(env["IDFORGE_REDIS_URL"]).startswith("redis://redis:6379")
    assert _default_of(env["IDFORGE_S3_ENDPOINT_URL"]) == "http://minio:9000"
    assert env["IDFORGE_MODEL_DIR"] == "/models"
    if name != "api":  # workers build or read weights there
        assert any(str(v).endswith(":/models") for v in services[name]["volumes"])


def test_required_secrets_use_the_error_if_unset_form(services):
    seen: set[str] = set()
    for name, svc in services.items():
        env = svc.get("environment") or {}
        assert isinstance(env, dict), f"{name}: use the mapping form for environment"
        for key in REQUIRED_SECRETS:
            if key in env:
                seen.add(key)
                assert REQUIRED_FORM.match(str(env[key])), f"{name}.{key} = {env[key]!r}"
    assert seen == set(REQUIRED_SECRETS)
    for name in APP_SERVICES:
        for key in ("IDFORGE_API_KEYS", "IDFORGE_SECRET_KEY", "IDFORGE_S3_SECRET_ACCESS_KEY",
                    "IDFORGE_WEBHOOK_SECRET"):
            assert key in services[name]["environment"], (name, key)
    assert "MINIO_ROOT_PASSWORD" in services["minio"]["environment"]


def test_no_secret_has_a_default_anywhere():
    text = COMPOSE.read_text()
    for key in ("IDFORGE_API_KEYS", "IDFORGE_SECRET_KEY", "IDFORGE_WEBHOOK_SECRET", "MINIO_ROOT_PASSWORD"):
        assert not re.search(r"\$\{" + key + r":?-", text), f"{key} has a default value"


def test_cpu_worker_runs_tiny_presets_on_both_queues_by_default(services):
    w = services["worker-cpu"]
    assert w["build"]["target"] == "worker-cpu"
    assert "profiles" not in w  # part of the default `docker compose up`
    cmd = [_default_of(str(c)) for c in w["command"]]
    assert cmd[0] == "worker"
    assert set(cmd[cmd.index("--queues") + 1].split(",")) == {"gpu", "cpu"}
    assert cmd[cmd.index("--concurrency") + 1] == "1"
    assert w["environment"]["IDFORGE_DEVICE"] == "cpu"


def test_gpu_worker_is_under_the_gpu_profile_with_an_nvidia_reservation(services):
    w = services["worker-gpu"]
    assert w["profiles"] == ["gpu"]
    assert w["build"]["target"] == "worker-gpu"
    devices = w["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    (dev,) = devices
    assert dev["driver"] == "nvidia" and dev["count"] == 1 and "gpu" in dev["capabilities"]
    cmd = w["command"]
    assert cmd[0] == "worker" and cmd[cmd.index("--queues") + 1] == "gpu"
    assert cmd[cmd.index("--concurrency") + 1] == "1"
    assert w["environment"]["IDFORGE_DEVICE"] == "cuda"
    assert any(str(v).split(":")[1] == "/models" for v in w["volumes"])
    # only the gpu worker is gated on the profile
    assert [n for n, s in services.items() if s.get("profiles")] == ["worker-gpu"]


@pytest.mark.parametrize("name", ["worker-cpu", "worker-gpu"])
def test_workers_get_time_to_finish_a_shard_on_stop(services, name):
    assert _duration_s(services[name]["stop_grace_period"]) >= 300


def test_no_service_is_privileged_or_shares_host_namespaces(services):
    for name, svc in services.items():
        assert not svc.get("privileged", False), name
        assert svc.get("network_mode") != "host", name
        assert svc.get("pid") != "host" and svc.get("ipc") != "host", name
        assert not set(svc.get("cap_add", [])) & {"ALL", "SYS_ADMIN"}, name
        assert str(svc.get("user", "")).split(":")[0] not in {"root", "0"}, name
    for name in APP_SERVICES:
        assert "ALL" in services[name]["cap_drop"]
        assert "no-new-privileges:true" in services[name]["security_opt"]


def test_compose_build_targets_exist_in_the_dockerfile(services, stages):
    targets = {s["build"]["target"] for s in services.values() if isinstance(s.get("build"), dict)}
    assert targets == FINAL_STAGES
    assert targets <= set(stages)


# ------------------------------------------------------------------------------------ Dockerfile

def test_dockerfile_has_the_three_final_stages_on_python_311_slim(stages):
    used = {s.base.lower() for s in stages.values()} | {
        src for s in stages.values() for src in _copy_sources(s)}
    finals = {n for n in stages if n not in used}
    assert finals == FINAL_STAGES
    for name in FINAL_STAGES:
        root = _chain(stages, name)[0].base
        assert re.fullmatch(r"python:(\$\{PYTHON_VERSION\}|3\.11)-slim", root), (name, root)
    assert re.search(r"^ARG PYTHON_VERSION=3\.11$", DOCKERFILE.read_text(), re.M)


@pytest.mark.parametrize("name", sorted(FINAL_STAGES))
def test_every_final_stage_runs_as_a_non_root_user(stages, name):
    users = _instructions(stages, name, "USER")
    assert users, f"{name} sets no USER (would run as root)"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, (name, users[-1])


def test_api_stage_installs_no_torch_and_no_worker_extra(stages):
    names = {s.name for s in _chain(stages, "api")}
    for s in list(_chain(stages, "api")):
        for src in _copy_sources(s):
            names |= {x.name for x in _chain(stages, src)}
    runs = [a for s in stages.values() if s.name in names for k, a in s.instructions if k == "RUN"]
    assert any("pip install" in r for r in runs)
    for r in runs:
        assert "torch" not in r.lower(), r
        assert "[worker" not in r and "embedded" not in r, r


@pytest.mark.parametrize("name,index_arg", [("worker-cpu", "TORCH_CPU_INDEX_URL"),
                                            ("worker-gpu", "TORCH_CUDA_INDEX_URL")])
def test_worker_stages_install_the_worker_extra_and_pinned_torch(stages, name, index_arg):
    runs = " ".join(_instructions(stages, name, "RUN"))
    assert "[worker]" in runs
    assert '"torch==${TORCH_VERSION}"' in runs and f"${{{index_arg}}}" in runs
    assert _env(stages, name)["IDFORGE_DEVICE"] == ("cpu" if name == "worker-cpu" else "cuda")


def test_torch_version_matches_the_pyproject_pin():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = [d for d in extra["worker"] if re.match(r"torch\s*==", d)]
    assert len(pins) == 1
    pinned = pins[0].split("==")[1].strip()
    m = re.search(r"^ARG TORCH_VERSION=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert m and m.group(1) == pinned
    assert re.search(r"^ARG TORCH_CPU_INDEX_URL=https://download\.pytorch\.org/whl/cpu$",
                     DOCKERFILE.read_text(), re.M)


@pytest.mark.parametrize("name", sorted(FINAL_STAGES))
def test_final_stages_are_offline_use_models_and_the_idforge_cli(stages, name):
    env = _env(stages, name)
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["IDFORGE_MODEL_DIR"] == "/models"
    assert _instructions(stages, name, "ENTRYPOINT")[-1] == '["idforge"]'
    cmd = _instructions(stages, name, "CMD")[-1]
    assert cmd.startswith('["serve"' if name == "api" else '["worker"'), cmd


def test_api_stage_has_a_healthz_healthcheck(stages):
    checks = _instructions(stages, "api", "HEALTHCHECK")
    assert checks and "/healthz" in checks[-1] and "8000" in checks[-1]
    assert "8000" in _instructions(stages, "api", "EXPOSE")


# --------------------------------------------------------------------------------- .dockerignore

def _ignore_patterns() -> list[str]:
    return [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()
            if ln.strip() and not ln.strip().startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    out = False
    for p in patterns:
        neg = p.startswith("!")
        pat = p[1:] if neg else p
        pat = pat.removeprefix("**/")
        if fnmatch.fnmatch(path, pat) or fnmatch.fnmatch(path.split("/")[-1], pat):
            out = not neg
    return out


def test_dockerignore_keeps_local_state_out_and_the_build_inputs_in(stages):
    patterns = _ignore_patterns()
    for path in (".venv", ".git", ".idforge", "tests", ".pytest_cache", "app/__pycache__",
                 "idforge.egg-info"):
        assert _ignored(path, patterns), path
    copied = [w for s in stages.values() for k, a in s.instructions
              if k == "COPY" and "--from" not in a for w in a.split()[:-1]]
    assert copied, "the Dockerfile copies no sources"
    for path in copied:
        assert not _ignored(path.rstrip("/"), patterns), f"{path} is COPYed but ignored"


# --------------------------------------------------------------------------------- the locked install

LOCK = ROOT / "constraints.txt"


def _lock() -> dict[str, str]:
    pins = {}
    for ln in LOCK.read_text().splitlines():
        if ln.strip() and not ln.startswith("#"):
            name, _, version = ln.partition("==")
            assert version, f"constraints.txt: {ln!r} is not an exact pin"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_every_installed_distribution_is_the_locked_version():
    # `make install` installs through the lock: a package missing from it (a dependency added
    # without `make lock`) or at another version means a new machine would resolve it afresh
    from importlib import metadata

    pins = _lock()
    off = []
    for dist in metadata.distributions():
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        if name == "idforge":
            continue
        version = dist.version.split("+")[0] if name == "torch" else dist.version
        if pins.get(name) != version:
            off.append(f"{name} {dist.version} (lock: {pins.get(name)})")
    assert not off, "not installed from the lock; run `make lock`: " + ", ".join(sorted(off))


def test_the_lock_keeps_the_pyproject_pins():
    pins = _lock()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for req in [*project["dependencies"], *(d for ds in project["optional-dependencies"].values() for d in ds)]:
        m = re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*==\s*([^\s;#]+)", req)
        if m:
            assert pins[re.sub(r"[-_.]+", "-", m.group(1)).lower()] == m.group(2), req
    assert pins["torch"] == "2.13.0"  # no local label: the CPU and the CUDA wheel both meet it


def test_make_install_and_the_images_install_from_the_lock(stages):
    make = (ROOT / "Makefile").read_text()
    installs = [ln for ln in make.splitlines() if "$(BIN)/pip install" in ln]
    assert installs and all("-c constraints.txt" in ln for ln in installs), installs
    # the images: constraints.txt is copied in and PIP_CONSTRAINT points at it before any install
    for name in FINAL_STAGES:
        chain = _chain(stages, name)
        env = _env(stages, name)
        copied = [a for s in chain for k, a in s.instructions if k == "COPY" and "constraints.txt" in a]
        assert copied and env.get("PIP_CONSTRAINT") == copied[0].split()[-1], (name, copied, env)
    assert (ROOT / ".ci" / "run").read_text().count("make test") == 1


def test_the_shipped_tiny_presets_reach_the_image():
    # weights are kept out of the build context, except the presets that ship inside the package
    from models.presets import shipped_files
    from models.zoo import SPECS

    patterns = _ignore_patterns()
    files = [p.relative_to(ROOT).as_posix()
             for spec in SPECS.values() if spec.tiny for p in shipped_files(spec).values()]
    assert any(f.endswith(".safetensors") for f in files) and any(f.endswith(".onnx") for f in files)
    for f in files:
        assert not _ignored(f, patterns), f"{f} is shipped but .dockerignore drops it"
    assert _ignored("models/weights/arcface-r100/backbone.pth", patterns)
