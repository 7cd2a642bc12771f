"""`python -m bench` (what `make bench` runs): every benchmark, one summary line each.

`scale` (the paper-scale job through the real service, `bench/scale.py --quick`: 10k and 100k
images with and without the report, about 20 minutes on 2 cores) runs only when named:
`python -m bench --only scale`; its full run to 500k is `python -m bench.scale`.

`--threads N` sets torch's intra-op threads (default: torch's own choice). On a small machine
shared with other busy processes, 2 spinning threads can slow every variant several-fold and
distort the ratios; `--threads 1` gives steadier numbers there. Each line prints the load average.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # benchmarks build tiny presets; nothing is downloaded

from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from bench import (
    api,
    arc2face,
    dispersion,
    embedders,
    evaluator,
    hyperface,
    langevin,
    packaging,
    quick_summary,
    redis_footprint,
    render,
    scale,
    set_threads,
    stylegan2,
)

# name -> callable returning its summary line
BENCHMARKS = {"render": render.run, "hyperface": hyperface.run, "arc2face": arc2face.run,
              "embedders": embedders.run, "stylegan2": stylegan2.run, "langevin": langevin.run,
              "dispersion": dispersion.run, "packaging": packaging.run, "api": api.run,
              "evaluator": lambda: " || ".join(evaluator.run()),
              "redis_footprint": lambda: " || ".join(redis_footprint.main([]))}
ON_REQUEST = {"scale": lambda: quick_summary(scale.main)}  # too long for every run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--only", choices=sorted(BENCHMARKS | ON_REQUEST), action="append", help="run only these")
    args = parser.parse_args(argv)
    set_threads(parser, args.threads)
    diffusers_logging.disable_progress_bar()  # keep the output to the summary lines
    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    for name in args.only or BENCHMARKS:
        print((BENCHMARKS | ON_REQUEST)[name](), flush=True)


if __name__ == "__main__":
    main()
