"""The probe's CUDA-event checks alone, on a real GPU (``make gpu-check`` runs them too):

    python bench/gpu_check_probe.py [--steps 50] [--size 8192]

See ``rankwatch.gpucheck.probe_timing`` for what is checked.
"""

from __future__ import annotations

import argparse
import sys

from rankwatch.gpucheck.checks import FAIL
from rankwatch.gpucheck.probe_timing import run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=50, help="probed steps (default: 50)")
    ap.add_argument("--size", type=int, default=8192, help="matrix size of the GPU work (default: 8192)")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU", file=sys.stderr)
        return 2
    checks = run(args.steps, args.size)
    for c in checks:
        print(f"{c.status:5s} {c.name}: {c.detail}")
    return 1 if any(c.status == FAIL for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
