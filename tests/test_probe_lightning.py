"""The PyTorch Lightning callback with the real Lightning Trainer on CPU (a tiny model)."""

from __future__ import annotations

from pathlib import Path

import pytest

pl = pytest.importorskip("pytorch_lightning")
torch = pytest.importorskip("torch")

# `offline`: the W&B offline-mode fixture, used by name.
from test_probe_wandb import alerts, offline, run_log, wandb  # noqa: E402, F401

from rankwatch import Probe  # noqa: E402
from rankwatch.exporters.identity import RankIdentity  # noqa: E402
from rankwatch.integrations.lightning import RankwatchLightningCallback  # noqa: E402

SEQ = 8
BATCH = 4


class Batches(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        return {"input_ids": torch.randint(0, 32, (SEQ,), generator=g), "y": torch.randn(1, generator=g)}


class Tiny(pl.LightningModule):
    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(32, 8)
        self.head = torch.nn.Linear(8, 1)
        self.fail_at = fail_at

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids).mean(1))

    def training_step(self, batch: dict, idx: int) -> torch.Tensor:
        if self.fail_at is not None and self.global_step >= self.fail_at:
            raise FloatingPointError("loss is NaN")
        return torch.nn.functional.mse_loss(self(batch["input_ids"]), batch["y"])

    def validation_step(self, batch: dict, idx: int) -> None:
        self(batch["input_ids"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(tmp_path: Path, cb: RankwatchLightningCallback, model: Tiny, **kw: object) -> None:
    loader = torch.utils.data.DataLoader(Batches(), batch_size=BATCH)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                         callbacks=[cb], **kw)
    trainer.fit(model, loader, torch.utils.data.DataLoader(Batches(), batch_size=BATCH))


def test_steps_sections_and_tokens(tmp_path: Path) -> None:
    probe = Probe(run="pl", port=0, wandb_run=None, identity=RankIdentity(node="n"))
    fit(tmp_path, RankwatchLightningCallback(probe), Tiny(), max_steps=6, accumulate_grad_batches=2,
        limit_val_batches=2, val_check_interval=6, num_sanity_val_steps=1)
    t = probe.totals()
    assert t.steps == 6 and t.step == 6
    assert t.tokens == 6 * 2 * BATCH * SEQ
    s = t.sections
    assert s["forward"][1] == 12 and s["backward"][1] == 12 and s["dataloader"][1] == 12
    assert s["optimizer"][1] == 6
    assert s["evaluate"][1] == 2  # after batches 6 and 12; the sanity check is not counted
    assert sum(v for name, (v, _) in s.items() if name != "evaluate") <= t.step_seconds * 1.05
    assert probe.errors == 0 and not probe._closed
    probe.close()


def test_failure_alerts_wandb_and_reaches_the_user_unchanged(tmp_path: Path, offline: Path) -> None:  # noqa: F811
    run = wandb.init(project="rankwatch-test", mode="offline")
    cb = RankwatchLightningCallback(run="pl-fail", port=0, wandb_run=run)
    with pytest.raises(FloatingPointError, match="loss is NaN"):
        fit(tmp_path, cb, Tiny(fail_at=3), max_steps=10, limit_val_batches=0)
    run.finish()
    wandb.teardown()
    assert cb.probe is not None and cb.probe._closed
    assert cb.probe.totals().steps == 3
    (alert,) = alerts(run_log(offline))
    assert alert.title == "Training run pl-fail failed" and alert.level == "ERROR"
    assert "FloatingPointError: loss is NaN" in alert.text and "3 steps completed" in alert.text
