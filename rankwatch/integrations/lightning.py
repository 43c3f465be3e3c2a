"""PyTorch Lightning integration (extra ``rankwatch[lightning]``)::

    from rankwatch.integrations.lightning import RankwatchLightningCallback
    trainer = pl.Trainer(..., callbacks=[RankwatchLightningCallback(run="llama70b-cpt")])

What is timed, from Lightning's hooks (automatic optimisation):

* step: one optimizer step (``trainer.global_step`` advancing), from one
  ``on_train_batch_end`` to the next, so it includes its gradient-accumulation batches;
* ``dataloader``: from the previous ``on_train_batch_end`` to ``on_train_batch_start``
  (fetching the batch; also checkpoint saving and logging done at batch end by other callbacks);
* ``forward``: ``on_train_batch_start`` to ``on_before_backward`` (``training_step``);
* ``backward``: ``on_before_backward`` to ``on_after_backward``. With DDP the gradient
  all-reduce overlaps the backward pass and its wait lands here: compare ranks on ``forward``;
* ``optimizer``: ``on_before_optimizer_step`` to ``on_train_batch_end``;
* ``evaluate``: ``on_validation_start`` to ``on_validation_end`` during fitting;
* tokens: ``tokens_fn(batch)`` if given, else ``batch["input_ids"].numel()`` for dict batches.

Pass ``probe=`` to share a probe; otherwise the callback creates one from ``run`` and the
remaining keyword arguments and closes it when fitting ends — with the exception, through
``on_exception``, if fitting fails, so that W&B gets the "failed" alert.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pytorch_lightning import Callback

from rankwatch.exporters.probe import Probe
from rankwatch.integrations.callbacks import guarded


def default_tokens(batch: Any) -> int | None:
    if isinstance(batch, dict):
        ids = batch.get("input_ids")
        if ids is not None and hasattr(ids, "numel"):
            return int(ids.numel())
    return None


class RankwatchLightningCallback(Callback):
    def __init__(self, probe: Probe | None = None, *, run: str | None = None,
                 tokens_fn: Callable[[Any], int | None] = default_tokens, **probe_kwargs: Any) -> None:
        self.probe = probe
        self._own = probe is None
        self._run = run
        self._probe_kwargs = probe_kwargs
        self._tokens_fn = tokens_fn
        self._mark = 0.0
        self._tokens = 0
        self._last_global_step = 0
        self._val_start: float | None = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.probe is None:  # invalid probe arguments raise here, before the first step
            self.probe = Probe(run=self._run or "lightning", **self._probe_kwargs)
        self._start(trainer)

    @guarded
    def _start(self, trainer: Any) -> None:
        self._last_global_step = trainer.global_step
        self._tokens = 0
        self.probe.begin_step()
        self._mark = time.perf_counter()

    @guarded
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        p = self.probe
        p.record_section("dataloader", time.perf_counter() - self._mark)
        n = self._tokens_fn(batch)
        if n:
            self._tokens += n
        p.begin_section("forward")

    @guarded
    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        if self.probe.section_open("forward"):
            self.probe.end_section("forward")
        self.probe.begin_section("backward")

    @guarded
    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        if self.probe.section_open("backward"):
            self.probe.end_section("backward")

    @guarded
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.probe.begin_section("optimizer")

    @guarded
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        p = self.probe
        for name in ("forward", "backward"):
            p.cancel_section(name)  # a training_step that returned None skips backward
        if p.section_open("optimizer"):
            p.end_section("optimizer")
        if trainer.global_step != self._last_global_step:
            self._last_global_step = trainer.global_step
            p.end_step(tokens=self._tokens, step=trainer.global_step)
            self._tokens = 0
            p.begin_step()
        self._mark = time.perf_counter()

    @guarded
    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._val_start = time.perf_counter()

    @guarded
    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or self.probe is None or self._val_start is None:
            return
        took = time.perf_counter() - self._val_start
        self._val_start = None
        self.probe.record_section("evaluate", took)
        self._mark += took  # not part of the next batch's dataloader time

    @guarded
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.probe.cancel_step()
        if self._own:
            self.probe.close()

    @guarded
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.probe is None:
            return
        self.probe.cancel_step()
        if self._own:
            self.probe.close(exception)
