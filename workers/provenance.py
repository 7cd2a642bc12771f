"""The platform a job's bytes were computed on: the manifest's `platform` block.

The same spec, seeds and weights give the same images only under the same numerics: library
versions (torch's kernels, cuDNN's algorithms, OpenCV's warps, onnxruntime's MLAS kernels, the
JPEG/PNG encoders), the device, the CPU instruction set torch dispatches to
(`ATEN_CPU_CAPABILITY`), the thread count (the order of parallel reductions) and the
deterministic-algorithm and TF32 switches. The seeded draws themselves are portable (see
`models.seeding`); everything here is about the network numerics.

`platform_block(device)` records all of it; `platform_differences(theirs, ours)` lists the fields
that affect numerics and differ between two blocks (`idforge reproduce` uses it).
"""

from __future__ import annotations

import os
import platform as _platform
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

PLATFORM_FORMAT = "idforge.platform/1"

# Environment variables that change numerics without showing up elsewhere in the block.
NUMERIC_ENV = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "DNNL_MAX_CPU_ISA",
               "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUBLAS_WORKSPACE_CONFIG",
               "NVIDIA_TF32_OVERRIDE", "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE")
# CPU flags that SIMD dispatchers (torch, OpenCV, onnxruntime's MLAS) choose kernels by.
SIMD_FLAGS = ("sse4_2", "avx", "fma", "f16c", "avx2", "avx_vnni", "avx512f", "avx512bw", "avx512vl",
              "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
              "neon", "asimd", "sve", "sve2")
# Top-level fields that only describe the machine; every other field can change the bytes.
INFORMATIONAL = frozenset({"format", "python", "os"})


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _libraries() -> dict[str, str | None]:
    """Versions of what computes or encodes the bytes (cv2's and PIL's codecs from the modules
    themselves: opencv ships under several distribution names)."""
    import cv2
    import numpy
    from PIL import Image, features

    return {
        "torch": torch.__version__,
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
        "opencv": cv2.__version__,
        "numpy": numpy.__version__,
        "pillow": Image.__version__,  # type: ignore[attr-defined]
        "libjpeg": features.version("jpg"),
        "zlib": features.version("zlib"),
    }


def _cpuinfo() -> tuple[str, list[str]]:
    """The CPU model and its SIMD flags from /proc/cpuinfo, else `platform.processor()`."""
    model, flags = "", set[str]()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if not model and key in ("model name", "hardware", "cpu model"):
            model = value.strip()
        elif not flags and key in ("flags", "features"):
            flags = set(value.split())
    return model or _platform.processor() or _platform.machine(), [f for f in SIMD_FLAGS if f in flags]


def platform_block(device: str) -> dict[str, Any]:
    """What this process computes with on `device` ("cpu", "cuda", "cuda:1"): the manifest's
    `platform` block."""
    cpu, cpu_features = _cpuinfo()
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    cudnn = torch.backends.cudnn
    return {
        "format": PLATFORM_FORMAT,
        "python": _platform.python_version(),
        "os": f"{_platform.system()} {_platform.release()}",
        "machine": _platform.machine(),
        "libraries": _libraries(),
        "device": device,
        "device_name": torch.cuda.get_device_name(torch.device(device)) if cuda else cpu,
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": cudnn.version() if cuda and cudnn.is_available() else None,  # type: ignore[no-untyped-call]
        "cpu": cpu,
        "cpu_features": cpu_features,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # honours ATEN_CPU_CAPABILITY
        "threads": torch.get_num_threads(),
        "deterministic": {
            "algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_deterministic": bool(cudnn.deterministic),
            "cudnn_benchmark": bool(cudnn.benchmark),
            "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn_allow_tf32": bool(cudnn.allow_tf32),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
        },
        "env": {k: os.environ[k] for k in NUMERIC_ENV if k in os.environ},
    }


def _flatten(block: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in block.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def platform_differences(theirs: dict[str, Any] | None, ours: dict[str, Any] | None) -> list[str] | None:
    """The numerics-affecting fields that differ, as "field: theirs -> ours" (an absent env var
    reads "unset"); None when either block is missing (a manifest from before the block)."""
    if not theirs or not ours:
        return None
    a, b = _flatten(theirs), _flatten(ours)
    out = []
    for key in sorted(set(a) | set(b)):
        if key.split(".", 1)[0] in INFORMATIONAL:
            continue
        x, y = a.get(key), b.get(key)
        if x != y:
            unset = "unset" if key.startswith("env.") else None
            out.append(f"{key}: {x if key in a else unset} -> {y if key in b else unset}")
    return out
