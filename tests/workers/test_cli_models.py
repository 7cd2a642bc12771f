"""`idforge models`: what an operator runs on a worker to place, pin and check weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from models.registry import ensure_model
from workers.cli import main


def _run(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    result = CliRunner().invoke(main, args, env=env)
    return result.exit_code, result.output


def test_list_pin_verify_round_trip(tmp_path: Path, model_dir: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(ensure_model("iresnet-tiny", model_dir), models / "iresnet-tiny")
    env = {"IDFORGE_MODEL_DIR": str(models), "HF_HUB_OFFLINE": "1"}

    code, out = _run(["models", "list"], env)
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines() if not line.startswith(" ")}
    assert " ok " in lines["iresnet-tiny"] and " buildable " in lines["stylegan2-tiny"]
    assert " unavailable " in lines["arcface-r34"] and "backbone.pth" in out

    code, out = _run(["models", "verify", "arcface-r34"], env)
    assert code == 1 and "backbone.pth" in out
    code, out = _run(["models", "pin", "arcface-r34"], env)
    assert code != 0 and "files missing" in out

    (models / "arcface-r34").mkdir()
    (models / "arcface-r34" / "backbone.pth").write_bytes(b"r34 weights as published")
    code, out = _run(["models", "verify", "arcface-r34"], env)
    assert code == 1 and "no sha256 is pinned" in out
    code, out = _run(["models", "pin", "arcface-r34"], env)
    assert code == 0
    registry_file = tmp_path / "registry.json"
    registry_file.write_text(out)
    pinned = json.loads(out)["models"]["arcface-r34"]["sha256"]["backbone.pth"]
    assert len(pinned) == 64
    code, out = _run(["models", "list"], {**env, "IDFORGE_MODEL_REGISTRY": str(registry_file)})
    assert code == 0 and " ok " in next(x for x in out.splitlines() if x.startswith("arcface-r34"))
    # Pinned, it verifies by sha256 (loading would still check the real file's keys and shapes).
    code, out = _run(["models", "verify", "arcface-r34", "iresnet-tiny"],
                     {**env, "IDFORGE_MODEL_REGISTRY": str(registry_file)})
    assert code == 0 and "arcface-r34: ok" in out and "iresnet-tiny: ok" in out


def test_covariates_fit_writes_a_file_dispersion_can_use(tmp_path: Path) -> None:
    import numpy as np
    import torch

    from models.sampling.covariates import Covariates

    rng = np.random.default_rng(0)
    direction = rng.normal(size=16)
    direction /= np.linalg.norm(direction)
    latents = rng.normal(size=(200, 16)).astype(np.float32)
    side = latents @ direction
    labels = np.where(side > 0.3, 1, np.where(side < -0.3, 0, -1))  # the middle band is unused
    np.savez(tmp_path / "labelled.npz", latents=latents, **{"label.pose": labels})

    code, out = _run(["covariates", "fit", str(tmp_path / "labelled.npz"), str(tmp_path / "cov.safetensors")], {})
    assert code == 0, out
    assert "pose: scale" in out and "1 directions in 16-d" in out
    fitted = Covariates.load(tmp_path / "cov.safetensors")
    assert list(fitted.names) == ["pose"]
    assert float(torch.dot(fitted.directions[0].double(), torch.from_numpy(direction))) > 0.95

    np.savez(tmp_path / "bad.npz", latents=latents)  # no label.* array
    code, out = _run(["covariates", "fit", str(tmp_path / "bad.npz"), str(tmp_path / "x.safetensors")], {})
    assert code == 2 and "INPUT_FILE" in out and not (tmp_path / "x.safetensors").exists()
