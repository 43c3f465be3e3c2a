"""The Hugging Face Trainer callback with the real transformers Trainer on CPU (tiny GPT-2
built from a config: no download)."""

from __future__ import annotations

from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from rankwatch import Probe  # noqa: E402
from rankwatch.exporters.identity import RankIdentity  # noqa: E402
from rankwatch.exporters.probe import ProbeTotals  # noqa: E402
from rankwatch.integrations.hf import RankwatchCallback  # noqa: E402

SEQ = 16
BATCH = 2


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_trainer(tmp_path: Path, callback: RankwatchCallback, **args: object) -> transformers.Trainer:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=SEQ, n_embd=16, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg)
    targs = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=BATCH, report_to="none",
        use_cpu=True, disable_tqdm=True, logging_steps=100, learning_rate=1e-3, **args)
    return transformers.Trainer(model=model, args=targs, train_dataset=Tokens(64), eval_dataset=Tokens(4),
                                callbacks=[callback])


class LastStepTotals(transformers.TrainerCallback):
    """The probe's totals as they stood at the end of the last training step."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self.totals: ProbeTotals | None = None

    def on_step_end(self, args: object, state: object, control: object, **kw: object) -> None:
        self.totals = self.probe.totals()


def test_trainer_steps_sections_tokens_and_checkpoints(tmp_path: Path) -> None:
    probe = Probe(run="hf", port=0, wandb_run=None, identity=RankIdentity(node="n"))
    trainer = tiny_trainer(tmp_path, RankwatchCallback(probe), max_steps=6, gradient_accumulation_steps=2,
                           save_strategy="steps", save_steps=3, eval_strategy="steps", eval_steps=3)
    last = LastStepTotals(probe)
    trainer.add_callback(last)  # runs after the probe's callback at each step's end
    trainer.train()
    t = probe.totals()
    assert t.steps == 6 and t.step == 6
    assert t.tokens == 6 * 2 * BATCH * SEQ  # 2 micro-batches per optimizer step
    s = t.sections
    assert s["forward"][1] == 12 and s["backward"][1] == 12
    assert s["optimizer"][1] == 6 and s["dataloader"][1] == 6
    assert s["checkpoint"][1] == 2 and s["evaluate"][1] == 2
    # Sections fit inside the steps: every section recorded by the end of the last step (the
    # step-3 evaluation and checkpoint included, whose evaluation forwards are not training
    # forwards) lies within one of the six steps. The step-6 evaluation and checkpoint come
    # after the last step ended, in a step that never completes, so they are left out.
    at_end = last.totals
    assert at_end is not None and at_end.steps == 6
    assert at_end.sections["checkpoint"][1] == 1 and at_end.sections["evaluate"][1] == 1
    assert sum(v for v, _ in at_end.sections.values()) <= at_end.step_seconds
    assert probe.errors == 0
    # The user's probe stays theirs: the callback does not close it.
    assert not probe._closed
    probe.close()


def test_callback_owns_its_probe_when_none_is_given(tmp_path: Path) -> None:
    cb = RankwatchCallback(run="hf-own", port=0, wandb_run=None)
    tiny_trainer(tmp_path, cb, max_steps=2).train()
    assert cb.probe is not None and cb.probe.run == "hf-own"
    assert cb.probe.totals().steps == 2
    assert cb.probe._closed  # closed at on_train_end
