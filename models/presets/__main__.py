"""`python -m models.presets build|check`: rebuild the tiny presets from their seeds; check the shipped files.

    python -m models.presets build [--out DIR] [NAME ...]
        Rerun the recipe (`ModelSpec.build` in models/zoo.py) into DIR/<name> (default: a new
        temporary directory) and print each file's sha256 beside its pin. Exit status 1 if any
        differs. Rebuilt bytes match the pins only on a machine with the same numerics as the one
        that made them (see models/presets/__init__.py); that is why the files are shipped.
        To replace the shipped presets on purpose (new pins), build into an empty DIR, copy the
        files over models/presets/<name>/ and update the pins in models/zoo.py together.

    python -m models.presets check [NAME ...]
        Verify the shipped files of this installation against the pins (no build). Exit status 1
        if any file is missing or differs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from models.modelspec import ModelSpec
from models.presets import PRESETS_DIR
from models.registry import hash_file
from models.zoo import SPECS

NUMERICS_NOTE = ("rebuilt bytes match the pins only on a machine with the same numerics as the one that "
                 "made them (CPU vector code paths, library versions); idforge ships the presets' bytes "
                 "in models/presets for that reason and never rebuilds them at run time")


def _tiny(names: list[str]) -> list[ModelSpec]:
    tiny = {n: s for n, s in SPECS.items() if s.tiny}
    unknown = [n for n in names if n not in tiny]
    if unknown:
        raise SystemExit(f"unknown tiny preset(s) {unknown}; tiny presets: {sorted(tiny)}")
    return [tiny[n] for n in (names or sorted(tiny))]


def _report(spec: ModelSpec, root: Path, label: str) -> int:
    """Print each file of `spec` under `root`, its sha256 (`label`) above its pin; returns the mismatches."""
    bad = 0
    for rel, f in sorted(spec.files.items()):
        path = root / rel
        if not path.is_file():
            bad += not f.optional
            print(f"  {rel}: {'absent (optional)' if f.optional else 'MISSING'}")
            continue
        got = hash_file(path)
        same = got == f.sha256
        bad += not same
        print(f"  {rel}: {'ok' if same else 'DIFFERS'}\n    {label:7} {got}\n    {'pin':7} {f.sha256}")
    return bad


def build(out: Path | None, names: list[str]) -> int:
    specs = _tiny(names)
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="idforge-presets-"))
    out.mkdir(parents=True, exist_ok=True)
    bad = 0
    for spec in specs:
        assert spec.build is not None, spec.name
        root = out / spec.name
        if root.exists():
            raise SystemExit(f"{root} exists; build into an empty directory (--out)")
        staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", dir=out))
        try:
            spec.build(staging, spec.seed)
            os.replace(staging, root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        print(f"{spec.name} (seed {spec.seed}) -> {root}")
        bad += _report(spec, root, "built")
    import torch

    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'all files match their pins' if not bad else f'{bad} file(s) differ from their pins'}; "
          f"note: {NUMERICS_NOTE}")
    return 1 if bad else 0


def check(names: list[str]) -> int:
    bad = 0
    for spec in _tiny(names):
        print(f"{spec.name} (shipped) {PRESETS_DIR / spec.name}")
        bad += _report(spec, PRESETS_DIR / spec.name, "shipped")
    print("all shipped files match their pins" if not bad else f"{bad} shipped file(s) missing or differ")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.presets", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build", help="rebuild the tiny presets from their seeds; print sha256 vs pin")
    p_build.add_argument("--out", type=Path, default=None,
                         help="directory to build into (default: a new temporary directory)")
    p_build.add_argument("names", nargs="*", help="tiny presets to build (default: all)")
    p_check = sub.add_parser("check", help="verify the shipped files against the pins")
    p_check.add_argument("names", nargs="*", help="tiny presets to check (default: all)")
    args = parser.parse_args(argv)
    if args.command == "build":
        return build(args.out, args.names)
    return check(args.names)


if __name__ == "__main__":
    sys.exit(main())
