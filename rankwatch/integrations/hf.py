"""Hugging Face ``transformers`` Trainer integration (extra ``rankwatch[hf]``)::

    from rankwatch.integrations.hf import RankwatchCallback
    trainer = Trainer(..., callbacks=[RankwatchCallback(run="llama70b-cpt")])

What is timed, from the Trainer's callback events and two hooks on the model:

* step: from one ``on_step_end`` to the next (the first from ``on_train_begin``): one
  optimizer step including its gradient-accumulation micro-batches;
* ``forward``: the model's ``forward`` (a forward pre-hook and hook), per micro-batch;
* ``backward``: from the end of a forward to the next micro-batch's forward or to
  ``on_pre_optimizer_step`` (so it includes gradient clipping). With DDP the gradient
  all-reduce overlaps the backward pass and its wait lands here: compare ranks on ``forward``;
* ``optimizer``: ``on_pre_optimizer_step`` to ``on_step_end`` (step, scheduler, zero_grad);
* ``evaluate`` / ``checkpoint``: the time after ``on_step_end`` up to ``on_evaluate`` /
  ``on_save`` (logging, evaluation, saving);
* ``dataloader``: the rest of the gap until ``on_step_begin`` (fetching the micro-batches);
* tokens: ``input_ids.numel()`` (padding included) of every training forward, read from the
  shape only, so it never synchronises the GPU.

Pass ``probe=`` to share a probe you created; otherwise the callback creates one with
``run`` (default ``args.run_name``) and the remaining keyword arguments, and closes it when
training ends.
"""

from __future__ import annotations

import time
from typing import Any

from transformers import TrainerCallback

from rankwatch.exporters.probe import Probe
from rankwatch.integrations.callbacks import guarded


class RankwatchCallback(TrainerCallback):
    def __init__(self, probe: Probe | None = None, *, run: str | None = None, **probe_kwargs: Any) -> None:
        self.probe = probe
        self._own = probe is None
        self._run = run
        self._probe_kwargs = probe_kwargs
        self._mark = 0.0
        self._in_step = False
        self._tokens = 0
        self._handles: list[Any] = []

    # Trainer events --------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        if self.probe is None:  # invalid probe arguments raise here, before the first step
            self.probe = Probe(run=self._run or args.run_name or "hf-trainer", **self._probe_kwargs)
        self._start(model)

    @guarded
    def _start(self, model: Any) -> None:
        if model is not None and not self._handles:
            self._handles = [model.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
                             model.register_forward_hook(self._post_forward)]
        self.probe.begin_step()
        self._mark = time.perf_counter()

    @guarded
    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.probe.record_section("dataloader", time.perf_counter() - self._mark)
        self._in_step = True
        self._tokens = 0

    @guarded
    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.probe.section_open("backward"):
            self.probe.end_section("backward")
        self.probe.begin_section("optimizer")

    @guarded
    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        p = self.probe
        if p.section_open("optimizer"):
            p.end_section("optimizer")
        self._in_step = False
        p.end_step(tokens=self._tokens, step=state.global_step)
        p.begin_step()
        self._mark = time.perf_counter()

    @guarded
    def on_evaluate(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._gap_section("evaluate")

    @guarded
    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._gap_section("checkpoint")

    @guarded
    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.probe is None:
            return
        self.probe.cancel_step()
        if self._own:
            self.probe.close()

    # model hooks -----------------------------------------------------------------------
    @guarded
    def _pre_forward(self, module: Any, args: tuple, kwargs: dict) -> None:
        if not (self._in_step and module.training):
            return  # evaluation or generation outside a training step
        p = self.probe
        if p.section_open("backward"):
            p.end_section("backward")  # the previous micro-batch's backward ended here
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        shape = getattr(ids, "shape", None)
        if shape is not None:
            self._tokens += int(ids.numel())
        p.begin_section("forward")

    @guarded
    def _post_forward(self, module: Any, args: tuple, output: Any) -> None:
        if self._in_step and self.probe.section_open("forward"):
            self.probe.end_section("forward")
            self.probe.begin_section("backward")

    def _gap_section(self, name: str) -> None:
        if self.probe is None or self._in_step:
            return
        now = time.perf_counter()
        self.probe.record_section(name, now - self._mark)
        self._mark = now
