"""Benchmarks that print side-by-side ratios: `python -m bench` runs them all."""

from __future__ import annotations

import argparse
import contextlib
import io
from collections.abc import Callable


def set_threads(parser: argparse.ArgumentParser, threads: int | None) -> None:
    """Apply a `--threads N` option (None = torch's own choice); N < 1 is a usage error."""
    import torch

    if threads is None:
        return
    if threads < 1:
        parser.error(f"--threads: must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def emit(lines: list[str], where: str) -> list[str]:
    """Print a benchmark's lines, the last one tagged with where it ran and the load; return them."""
    import os

    lines[-1] += f"  [{where}, load avg {os.getloadavg()[0]:.1f}]"
    for line in lines:
        print(line, flush=True)
    return lines


def quick_summary(main: Callable[[list[str]], list[str]]) -> str:
    """`python -m bench`'s line for a benchmark whose `main` prints and returns its lines: the
    `--quick` run, its lines joined, nothing printed."""
    with contextlib.redirect_stdout(io.StringIO()):
        lines = main(["--quick"])
    return " || ".join(lines)
