"""trainer.accumulate: a step's batch as micro-batches gives the same step (stackwise_bench/training/accumulate.py)."""

from __future__ import annotations

import pytest
import torch

from stackwise_bench.train import run
from stackwise_bench.training.accumulate import merge_outputs, micro_batches
from stackwise_bench.training.tasks import ImageClassification, Output

from conftest import compose, read_metrics


def test_micro_batches_cover_the_batch_in_order():
    x, y = torch.arange(10).reshape(5, 2), torch.arange(5)
    chunks = micro_batches((x, y), 2)
    assert [len(c[0]) for c in chunks] == [3, 2]  # the first one sample longer
    assert torch.equal(torch.cat([c[0] for c in chunks]), x) and torch.equal(torch.cat([c[1] for c in chunks]), y)
    assert len(micro_batches((x, y), 9)) == 5  # never an empty micro-batch


def test_merged_loss_is_the_sample_weighted_mean():
    outs = [Output(torch.tensor(1.0), 3, {"correct": torch.tensor(2)}), Output(torch.tensor(4.0), 1, {"correct": 1})]
    merged = merge_outputs(outs)
    assert float(merged.loss) == pytest.approx((3 * 1.0 + 4.0) / 4) and merged.samples == 4
    assert int(merged.tallies["correct"]) == 3


def test_micro_batches_accumulate_the_whole_batchs_gradient_with_a_penalty():
    """The trainer's step on 5 samples as 2 micro-batches (3 + 2): the same gradients as one batch of 5, a part's
    penalty counted once (a wrong weighting, e.g. none, doubles them)."""
    from types import SimpleNamespace

    from stackwise_bench.training.parts import Parts, StepPart
    from stackwise_bench.training.trainer import Trainer

    class Penalty(StepPart):
        key = "penalty"

        def __init__(self, model):
            self.model = model

        def penalty(self):
            return 0.1 * self.model.weight.square().sum()

    task = ImageClassification(3, lambda: torch.autocast("cpu", enabled=False), "cpu")
    torch.manual_seed(0)
    batch = (torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0]))
    grads = {}
    for n in (1, 2):
        torch.manual_seed(1)
        model = torch.nn.Linear(4, 3)
        trainer = Trainer.__new__(Trainer)
        trainer.accumulate, trainer.task = n, task
        trainer.scaler, trainer.parts = torch.amp.GradScaler("cpu", enabled=False), Parts([Penalty(model)])
        out = trainer._backward(model, batch, SimpleNamespace(epoch=0, step=0))
        grads[n] = (model.weight.grad.clone(), model.bias.grad.clone(), float(out.loss), out.samples)
    torch.testing.assert_close(grads[2][0], grads[1][0])
    torch.testing.assert_close(grads[2][1], grads[1][1])
    assert grads[2][2] == pytest.approx(grads[1][2]) and grads[2][3] == grads[1][3] == 5


@pytest.mark.slow
def test_accumulated_vit_run_matches_one_batch(tmp_path, monkeypatch):
    """A ViT (no batch statistics) trained with 4 micro-batches per step: the same steps and, up to float rounding,
    the same losses and accuracies as whole batches."""
    base = ["model=vit_micro_p4", "monitors=none", "trainer.threads=1", "trainer.max_epochs=2"]
    whole = run(compose(base), tmp_path / "whole")
    sizes = []
    objective = ImageClassification.objective

    def spy(self, model, batch, epoch, step):
        sizes.append(len(batch[0]))
        return objective(self, model, batch, epoch, step)

    monkeypatch.setattr(ImageClassification, "objective", spy)
    split = run(compose([*base, "trainer.accumulate=4"]), tmp_path / "split")
    assert sizes and set(sizes) == {8}  # batches of 32 as 4 micro-batches of 8
    rows, ref = read_metrics(tmp_path / "split"), read_metrics(tmp_path / "whole")
    assert [r["step"] for r in rows] == [r["step"] for r in ref] and split["train"]["flops"] == whole["train"]["flops"]
    assert [r["train_loss"] for r in rows] == pytest.approx([r["train_loss"] for r in ref], rel=1e-4)
    assert [r["val_loss"] for r in rows] == pytest.approx([r["val_loss"] for r in ref], rel=1e-4)
    assert split["test"]["top1"] == pytest.approx(whole["test"]["top1"], abs=0.5)
