"""regime=depth_time with its default (null) stacks and boundaries: derived from the model, so every model option
that has more than one block (per stage) grows, and the one that cannot is refused in one sentence (issue 25)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from stackwise_bench.build import build_model, build_run
from stackwise_bench.errors import ConfigError
from stackwise_bench.nn.growth import INITS, MODES, depth_of, grow, truncate
from stackwise_bench.nn.models import create_model
from stackwise_bench.nn.resnet import CifarResNet
from stackwise_bench.training.regime import Classical, DepthTime, default_stacks, equal_shares

from conftest import CONF, ROOT, compose

# Every option of conf/model/ and the stacks regime=depth_time derives for it (None: it cannot grow).
DERIVED = {
    "resnet8": None,
    "resnet14": [1, 2],
    "vit_micro_p4": [1, 2],
    "vit_tiny_p4": [3, 6, 12],
    "deit_tiny": [3, 6, 12],
    "deit_small": [3, 6, 12],
}
REFUSAL = (
    "regime=depth_time grows a model block by block, and model=resnet8 has 1 block per stage: pick model=resnet14 "
    "or a ViT (vit_micro_p4, vit_tiny_p4, deit_tiny), or regime=classical."
)


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


# The causal language models' options and their derived stacks (regime=depth_time on gpt_micro:
# tests/test_lm_train.py).
LM_DERIVED = {"gpt_micro": [1, 2, 4], "gpt_mini": [3, 6], "gpt2_small": [3, 6, 12], "llama_micro": [1, 2, 4]}
LM_DERIVED |= {"gpt2_medium": [3, 6, 12, 24], "gpt2_large": [9, 18, 36], "llama_mini": [3, 6]}

# The BERT encoders' options: bert.encoder.layer halved back (through train: tests/test_bert_train.py).
BERT_DERIVED = {"bert_micro": [1, 2], "bert_tiny": [1, 2], "bert_base": [3, 6, 12], "bert_large": [3, 6, 12, 24]}


def test_every_model_option_is_listed():
    listed = {**DERIVED, **LM_DERIVED, **BERT_DERIVED}
    assert sorted(p.stem for p in (CONF / "model").glob("*.yaml")) == sorted(listed)


@pytest.mark.parametrize("name", sorted(BERT_DERIVED))
def test_encoders_derive_their_stacks(name):
    from hydra.utils import instantiate

    cfg = compose(["regime=depth_time", f"model={name}", "dataset=shakespeare"])
    regime = DepthTime(**{k: v for k, v in cfg.regime.items() if k != "_target_"})
    with torch.device("meta"):
        model = instantiate(cfg.model, vocab_size=260, pad_token_id=256)
    regime.setup(model, name)
    assert regime.stacks == BERT_DERIVED[name] and len(model.bert.encoder.layer) == BERT_DERIVED[name][0]


@pytest.mark.parametrize("name", sorted(LM_DERIVED))
def test_language_models_derive_their_stacks(name):
    from stackwise_bench.nn.causal_lm import build_named

    regime = DepthTime(**{k: v for k, v in compose(["regime=depth_time"]).regime.items() if k != "_target_"})
    regime.setup(build_named(name, vocab_size=256, device="meta"), name)
    assert regime.stacks == LM_DERIVED[name]


@pytest.mark.parametrize("name", [n for n, stacks in DERIVED.items() if stacks])
def test_default_stacks_end_at_the_model_depth_and_grow_back_to_the_configured_model(name):
    cfg = compose(["regime=depth_time", f"model={name}", "model.pretrained=false"])
    configured, _, _ = build_model(cfg, 10)
    regime = DepthTime(**{k: v for k, v in cfg.regime.items() if k != "_target_"})
    assert regime.stacks is None and regime.boundaries is None  # the YAML leaves both to the model
    model = copy.deepcopy(configured)
    regime.setup(model, name)
    assert regime.stacks == DERIVED[name] and regime.stacks[-1] == depth_of(configured)
    assert regime.boundaries == pytest.approx(equal_shares(len(regime.stacks)))
    assert regime.describe()["stacks"] == DERIVED[name]  # what summary.json's train section records
    assert depth_of(model) == regime.stacks[0]
    for depth in regime.stacks[1:]:
        grow(model, depth, regime.building_mode, regime.init, torch.Generator().manual_seed(0))
    assert depth_of(model) == depth_of(configured)
    assert count(model) == count(configured)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in configured.named_parameters()]


def test_the_model_that_cannot_grow_is_refused_in_one_sentence():
    cfg = compose(["regime=depth_time", "model=resnet8"])
    with pytest.raises(ConfigError) as err:
        build_run(cfg, resume=False)
    assert str(err.value) == REFUSAL
    with pytest.raises(ConfigError) as err:
        build_run(compose(["regime=classical_matched", "model=resnet8"]), resume=False)
    assert str(err.value).startswith("regime.match=true spends the FLOPs of a depth_time run, which grows a model")
    vit = create_model("vit_micro_p4", 10, pretrained=False, img_size=8, patch_size=4, embed_dim=32, depth=1)
    with pytest.raises(ConfigError) as err:
        DepthTime().setup(vit, "vit_micro_p4")
    assert str(err.value) == (
        "regime=depth_time grows a model block by block, and model=vit_micro_p4 has 1 block: raise model.depth "
        "(e.g. model.depth=2), or use regime=classical."
    )


@pytest.mark.parametrize(
    "depth, stacks",
    [(12, [3, 6, 12]), (8, [1, 2, 4, 8]), (4, [1, 2, 4]), (2, [1, 2]), (6, [3, 6]), (1, [1])]
    + [(3, [2, 3]), (5, [3, 5]), (7, [4, 7]), (9, [5, 9])],  # odd: one growth from the larger half
)
def test_default_stacks_halve_back_while_even(depth, stacks):
    assert default_stacks(depth) == stacks
    assert equal_shares(len(stacks)) == pytest.approx([i / len(stacks) for i in range(1, len(stacks))])
    assert equal_shares(3) == pytest.approx([1 / 3, 2 / 3])


def tiny_vit(depth: int):
    return create_model(
        "vit_micro_p4", 10, pretrained=False, img_size=8, patch_size=4, embed_dim=16, depth=depth, num_heads=2
    )


@pytest.mark.parametrize("family", ["vit", "resnet"])
@pytest.mark.parametrize("depth", [3, 5])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("init", INITS)
def test_odd_depths_grow_in_every_mode_and_init(family, depth, mode, init):
    """Odd depths start at (d+1)/2 >= 2, so even init=copy on a CifarResNet (block 0 is never copied) grows."""
    full = tiny_vit(depth) if family == "vit" else CifarResNet(depth, 10, widths=(4, 8, 8))
    model = copy.deepcopy(full)
    regime = DepthTime(building_mode=mode, init=init)
    regime.setup(model)
    assert regime.stacks == default_stacks(depth) and depth_of(model) == (depth + 1) // 2
    grow(model, depth, mode, init, torch.Generator().manual_seed(0))
    assert depth_of(model) == depth and count(model) == count(full)


def test_written_stacks_and_boundaries_are_kept_and_checked_as_before():
    regime = DepthTime([1, 2, 4])  # boundaries null: equal shares
    assert regime.stacks == [1, 2, 4] and regime.boundaries == pytest.approx([1 / 3, 2 / 3])
    with pytest.raises(ConfigError, match=r"^regime.stacks=\[1, 2\] ends at depth 2 but the model has depth 4"):
        DepthTime([1, 2], [0.5]).setup(tiny_vit(4))
    regime = DepthTime(boundaries=[0.5])  # stacks null, one boundary: fits a 2-stage derivation
    regime.setup(tiny_vit(2))
    assert regime.stacks == [1, 2] and regime.boundaries == [0.5]
    with pytest.raises(ConfigError) as err:
        DepthTime(boundaries=[0.5]).setup(tiny_vit(4))
    assert str(err.value) == (
        "regime.boundaries=[0.5] has 1 entries but regime.stacks=[1, 2, 4] (derived from the model's depth 4; set "
        "regime.stacks to choose) needs 2, one per stage after the first."
    )


def test_the_study_preset_keeps_its_own_stacks():
    cfg = compose(["experiment=depth_time", "regime=depth_time", "dataset=digits", "model.img_size=8"])
    assert list(cfg.regime.stacks) == [3, 6, 12] and list(cfg.regime.boundaries) == [0.333, 0.667]
    regime = DepthTime(**{k: v for k, v in cfg.regime.items() if k != "_target_"})
    model, _, _ = build_model(cfg, 10)
    regime.setup(model, cfg.model.name)
    assert regime.stacks == [3, 6, 12] and regime.boundaries == [0.333, 0.667] and depth_of(model) == 3


def flops_per_image(model, size: int) -> float:
    """Forward + backward FLOPs of one image, attention on the math backend (the fused CPU kernel counts zero)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(torch.randn(2, 3, size, size)), torch.zeros(2, dtype=torch.long)).backward()
    return counter.get_total_flops() / 2


def test_the_matched_classical_arm_spends_what_the_derived_schedule_spends():
    """classical_matched on vit_micro_p4 (stacks null: [1, 2] over halves): its budget is the FLOPs of half the
    steps at depth 1 and half at depth 2, counted here on truncated copies of the model."""
    overrides = ["dataset=digits", "model=vit_micro_p4", "trainer.batch_size=64", "trainer.max_epochs=2"]
    built = build_run(compose([*overrides, "regime=classical_matched"]), resume=False)
    assert isinstance(built.regime, Classical) and built.regime.matched.stacks == [1, 2]
    assert built.regime.describe() == {"regime": "classical", "matched_stacks": [1, 2], "matched_boundaries": [0.5]}
    steps = 2 * len(built.loaders.train)
    model, _, _ = build_model(compose([*overrides, "regime=classical_matched"]), 10)
    rates = []
    for depth in (1, 2):
        shallow = copy.deepcopy(model)
        truncate(shallow, depth)
        rates.append(flops_per_image(shallow, 8))
    grow_at = int(0.5 * steps + 0.5)
    expected = (grow_at * rates[0] + (steps - grow_at) * rates[1]) * 64
    assert built.trainer.max_flops == pytest.approx(expected, rel=1e-9)
    assert built.trainer.max_steps == int(expected // (rates[1] * 64))
    assert depth_of(built.model) == 2  # the matched arm trains the full model


def train_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    run_dir = tmp_path / "run"
    args = ["-m", "stackwise_bench.train", "regime=depth_time", "dataset=digits", "monitors=none", *overrides]
    return subprocess.run(
        [sys.executable, *args, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
    )


@pytest.mark.slow
@pytest.mark.parametrize("model", ["resnet14", "vit_micro_p4"])
def test_the_cli_trains_depth_time_with_the_default_stacks(tmp_path, model):
    done = train_cli(tmp_path, f"model={model}", "trainer.max_epochs=2", "trainer.batch_size=128", "trainer.threads=1")
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["train"]["stacks"] == [1, 2] and summary["train"]["boundaries"] == [0.5]
    assert summary["test"]["checkpoint_depth"] == 2 and summary["params"]["total"] == count(
        build_model(compose([f"model={model}", "dataset=digits"]), 10)[0]
    )


@pytest.mark.slow
def test_the_cli_refuses_resnet8_in_one_sentence_and_leaves_no_run_folder(tmp_path):
    done = train_cli(tmp_path, "model=resnet8")
    assert done.returncode == 2
    output = (done.stdout + done.stderr).strip().splitlines()
    assert [line for line in output if "ERROR" in line][-1].endswith(REFUSAL) and REFUSAL in output[-1]
    assert not (tmp_path / "run").exists()
