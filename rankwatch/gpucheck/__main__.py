"""`python -m rankwatch.gpucheck`: gpu-check without the rest of the CLI, so that it runs in a
GPU machine's own Python (which has torch on CUDA but not rankwatch's alerting dependencies)."""

from __future__ import annotations

import argparse
import logging
import sys

from rankwatch.errors import RankwatchError
from rankwatch.gpucheck.cli import register


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rankwatch.gpucheck")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["gpu-check", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except RankwatchError as exc:
        print(f"rankwatch gpu-check: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
