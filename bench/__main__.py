"""`python -m bench` (what `make bench` runs): every benchmark, one summary line each."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # benchmarks build tiny presets; nothing is downloaded

from diffusers.utils import logging as diffusers_logging  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

from bench import render  # noqa: E402

BENCHMARKS = {"render": render.run}  # name -> callable returning its summary line


def main() -> None:
    diffusers_logging.disable_progress_bar()  # keep the output to the summary lines
    transformers_logging.disable_progress_bar()
    for name, run in BENCHMARKS.items():
        print(run(), flush=True)


if __name__ == "__main__":
    main()
