"""A small real data-parallel training job instrumented with the rankwatch probe.

Four CPU ranks, gloo backend, synthetic data, one of them slowed down::

    torchrun --nproc_per_node=4 examples/train_ddp.py --slow-rank 2 --slow-factor 1.3 \
        --steps 300 --probe-port-base 9420

Each rank serves its timings on ``probe-port-base + LOCAL_RANK`` (``/metrics``). The gradient
all-reduce is an explicit ``dist.all_reduce`` inside ``probe.section("comm")``, so the time a
rank spends waiting for its peers is measured apart from its compute. The slowed rank stretches
its forward, backward and optimizer work by ``--slow-factor``: ``--slow-mode sleep`` (default) makes the
host wait, as it would for a throttled GPU, and leaves the CPU to the other ranks — on a small
shared machine a busy slow rank would slow its peers as well; ``--slow-mode compute`` spins on
extra matrix multiplies instead.

What a user sees: every rank's step time is the same (the all-reduce makes the fast ranks wait),
the slow rank's forward+backward+optimizer time per step is the highest and its comm wait the
lowest. The last lines each rank prints show both; Prometheus shows them per rank with e.g.::

    sum by (rank) (rate(rankwatch_section_seconds_total{section=~"forward|backward|optimizer"}[1m]))
      / sum by (rank) (rate(rankwatch_steps_total[1m]))

``--wandb-mode offline`` starts a W&B run on rank 0 (``WANDB_DIR`` decides where it is written);
with ``--wandb-gather`` every rank sends its section means to rank 0 every ``--wandb-every``
steps so that W&B shows the cross-rank spread.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

import rankwatch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200, help="steps to run (0: until --stop-file appears)")
    ap.add_argument("--stop-file", default=None,
                    help="stop at the next check after this file appears (all ranks stop at the same step)")
    ap.add_argument("--check-every", type=int, default=10, help="steps between checks of --stop-file")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=32, help="sequence length (tokens per sample)")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--slow-rank", type=int, default=-1, help="global rank to slow down (-1: none)")
    ap.add_argument("--slow-factor", type=float, default=1.3, help="compute time multiplier of the slow rank")
    ap.add_argument("--slow-mode", choices=("sleep", "compute"), default="sleep")
    # Not "--run": torchrun would read it as an abbreviation of its own --run-path.
    ap.add_argument("--run-id", default="train-ddp-example", help="training run id (probe label `run`)")
    ap.add_argument("--probe-port-base", type=int, default=None,
                    help="serve on this + LOCAL_RANK (default $RANKWATCH_PROBE_BASE_PORT or 9420; 0: don't serve)")
    ap.add_argument("--linger", type=float, default=0.0,
                    help="keep serving this many seconds after the last step (lets Prometheus scrape the end)")
    ap.add_argument("--wandb-mode", choices=("online", "offline"), default=None,
                    help="start a W&B run on rank 0 (default: no W&B)")
    ap.add_argument("--wandb-every", type=int, default=50)
    ap.add_argument("--wandb-gather", action="store_true", help="gather section means to rank 0 for W&B")
    ap.add_argument("--log-every", type=int, default=50)
    return ap.parse_args(argv)


def make_model(width: int, layers: int) -> nn.Module:
    blocks: list[nn.Module] = []
    for _ in range(layers):
        blocks += [nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)]
    return nn.Sequential(*blocks)


class Slowdown:
    """Stretches a block of work on the chosen rank by ``factor``."""

    def __init__(self, active: bool, factor: float, mode: str, width: int) -> None:
        self.extra = max(factor - 1.0, 0.0) if active else 0.0
        self.mode = mode
        self._a = torch.randn(width, width)

    def after(self, started: float) -> None:
        if not self.extra:
            return
        target = (time.perf_counter() - started) * self.extra
        if self.mode == "sleep":
            time.sleep(target)
            return
        deadline = time.perf_counter() + target
        while time.perf_counter() < deadline:
            self._a = torch.tanh(self._a @ self._a)


def allreduce_gradients(params: list[nn.Parameter], world: int) -> None:
    # One flat all-reduce: what DDP does in buckets, here explicit so its wait can be timed.
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def should_stop(stop_file: str | None, rank: int) -> bool:
    """Rank 0 looks for the stop file; an all-reduce makes every rank agree on the same step."""
    if stop_file is None:
        return False
    flag = torch.tensor([1 if rank == 0 and os.path.exists(stop_file) else 0])
    dist.all_reduce(flag)
    return bool(flag.item())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.steps <= 0 and not args.stop_file:
        sys.exit("--steps 0 needs --stop-file: the job would never end")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    torch.manual_seed(0)  # the same initial weights on every rank, as DDP's broadcast would give
    model = make_model(args.width, args.layers)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    gen = torch.Generator().manual_seed(1000 + rank)
    slow = Slowdown(rank == args.slow_rank, args.slow_factor, args.slow_mode, args.width)
    tokens = args.batch * args.seq

    wandb_run = None
    if args.wandb_mode and rank == 0:
        import wandb

        wandb_run = wandb.init(project="rankwatch-example", name=args.run_id, mode=args.wandb_mode,
                               config=vars(args))
    port = None if args.probe_port_base is None else (
        0 if args.probe_port_base == 0 else args.probe_port_base + local_rank)
    probe = rankwatch.Probe(run=args.run_id, port=port, wandb_run=wandb_run,
                            wandb_every=args.wandb_every, wandb_gather=args.wandb_gather)
    print(f"rank {rank}: probe on port {probe.port}", flush=True)

    dist.barrier()  # start the timed loop together: rendezvous skew is not a step
    with probe:
        step = 0
        while args.steps <= 0 or step < args.steps:
            step += 1
            with probe.step(tokens=tokens, step=step):
                with probe.section("dataloader"):
                    x = torch.randn(args.batch, args.seq, args.width, generator=gen)
                    y = torch.randn(args.batch, args.seq, args.width, generator=gen)
                with probe.section("forward"):
                    t0 = time.perf_counter()
                    loss = nn.functional.mse_loss(model(x), y)
                    slow.after(t0)
                with probe.section("backward"):
                    t0 = time.perf_counter()
                    loss.backward()
                    slow.after(t0)
                with probe.section("comm"):
                    allreduce_gradients(params, world)
                with probe.section("optimizer"):
                    t0 = time.perf_counter()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    slow.after(t0)
            if rank == 0 and step % args.log_every == 0:
                print(f"step {step} loss {loss.item():.4f}", flush=True)
            if step % args.check_every == 0 and should_stop(args.stop_file, rank):
                break
        t = probe.totals()
        compute = sum(t.sections.get(s, (0.0, 0))[0] for s in ("forward", "backward", "optimizer"))
        print(f"rank {rank}: step {t.step_seconds / t.steps * 1e3:.1f} ms, compute {compute / t.steps * 1e3:.1f} ms, "
              f"comm wait {t.sections['comm'][0] / t.steps * 1e3:.1f} ms per step", flush=True)
        if args.linger > 0:
            print(f"rank {rank}: lingering {args.linger:.0f}s", flush=True)
            time.sleep(args.linger)
    if wandb_run is not None:
        wandb_run.finish()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
