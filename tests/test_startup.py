"""Start-up stays cheap: the default run's import path leaves the heavy optional libraries alone.

How fast it starts is measured by ``scripts/benchmark.py`` (figure ``startup``), not here.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import pytest
import torch

from stackwise_bench.training.metrics import evaluate

from conftest import ROOT

# Only runs that ask for them may import these: timm (ViT/DeiT), peft (lora.rank > 0),
# torchvision (CIFAR), and never transformers, scikit-learn/scipy or torchmetrics before training
# (torchmetrics computes the final test metrics, imported only then).
HEAVY = ("timm", "peft", "transformers", "sklearn", "scipy", "torchmetrics", "torchvision")

DEFAULT_PATH = """
import json, sys
import stackwise_bench.train
from stackwise_bench.data import BatchLoader, load_digits
from stackwise_bench.nn.lora import apply_lora, count_parameters
from stackwise_bench.training.metrics import evaluate
from stackwise_bench.nn.models import create_model
from stackwise_bench.training.optim import build_optimizer
from stackwise_bench.training.runtime import Runtime
from stackwise_bench.training.trainer import Trainer  # noqa: F401  (its imports are on the default path too)

runtime = Runtime.create(device="cpu")
runtime.apply()
data = load_digits()
model = apply_lora(create_model("resnet8", data.num_classes), rank=0)
count_parameters(model)
build_optimizer(model, "adamw", lr=1e-3)
loader = BatchLoader(data.test_x[:64], data.test_y[:64], 64, mean=data.mean, std=data.std)
# per-epoch validation (full=False) stays light; the final test metrics (full=True) use torchmetrics
evaluate(model, loader, data.num_classes, runtime.autocast, runtime.device, full=False)
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""


@pytest.mark.slow
def test_default_run_imports_no_heavy_library():
    out = subprocess.run([sys.executable, "-c", DEFAULT_PATH], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert not loaded & set(HEAVY), f"the default run imports {sorted(loaded & set(HEAVY))}"


class _Batches:
    """A loader stand-in: ``epoch(0)`` yields (logits-as-inputs, targets)."""

    def __init__(self, logits, targets, batch):
        self.parts = list(zip(logits.split(batch), targets.split(batch)))

    def epoch(self, _):
        return iter(self.parts)


@pytest.mark.parametrize("num_classes", [4, 7])
def test_metrics_match_torchmetrics(num_classes):
    """The reported metrics are torchmetrics'; the light per-epoch top-1 (no torchmetrics) agrees with it."""
    from torchmetrics.classification import (
        MulticlassAccuracy,
        MulticlassConfusionMatrix,
        MulticlassF1Score,
        MulticlassPrecision,
        MulticlassRecall,
    )

    gen = torch.Generator().manual_seed(num_classes)
    logits = torch.randn(203, num_classes, generator=gen)
    targets = torch.randint(0, num_classes - 1, (203,), generator=gen)  # the last class never occurs as a target
    logits[:, 0] -= 5.0  # and class 0 is rarely predicted
    got = evaluate(
        torch.nn.Identity(),
        _Batches(logits, targets, 64),
        num_classes,
        contextlib.nullcontext,
        torch.device("cpu"),
        full=True,
    )
    ref = {
        "top1": MulticlassAccuracy(num_classes, average="micro")(logits, targets),
        "top5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")(logits, targets),
        "f1_macro": MulticlassF1Score(num_classes, average="macro")(logits, targets),
        "precision_macro": MulticlassPrecision(num_classes, average="macro")(logits, targets),
        "recall_macro": MulticlassRecall(num_classes, average="macro")(logits, targets),
    }
    for key, value in ref.items():
        assert got[key] == pytest.approx(100.0 * float(value), abs=1e-4), key
    per_class = MulticlassAccuracy(num_classes, average=None)(logits, targets)
    assert got["per_class_top1"] == pytest.approx([100.0 * v for v in per_class.tolist()], abs=1e-3)
    assert got["confusion_matrix"] == MulticlassConfusionMatrix(num_classes)(logits, targets).tolist()
    assert got["num_samples"] == 203 and got["infer_img_s"] > 0
    light = evaluate(
        torch.nn.Identity(), _Batches(logits, targets, 64), num_classes, contextlib.nullcontext, torch.device("cpu")
    )
    assert light["top1"] == pytest.approx(100.0 * float(ref["top1"]), abs=1e-4) and "top5" not in light


def test_macro_metrics_skip_classes_never_seen():
    # confusion [[2, 0, 0], [1, 1, 0], [0, 0, 0]]: class 2 is neither a target nor a prediction
    targets = torch.tensor([0, 0, 1, 1])
    logits = torch.nn.functional.one_hot(torch.tensor([0, 0, 0, 1]), 3).float()
    report = evaluate(
        torch.nn.Identity(), _Batches(logits, targets, 4), 3, contextlib.nullcontext, torch.device("cpu"), full=True
    )
    assert report["recall_macro"] == pytest.approx(100.0 * (1.0 + 0.5) / 2)
    assert report["precision_macro"] == pytest.approx(100.0 * (2 / 3 + 1.0) / 2)
    assert report["per_class_top1"] == [100.0, 50.0, 0.0]
