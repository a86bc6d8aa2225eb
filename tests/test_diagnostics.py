"""Diagnostics: every statistic against a hand computation, layer naming on real models, zero effect on training."""

import contextlib
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from stackwise_bench.errors import ConfigError
from stackwise_bench.nn.models import create_model
from stackwise_bench.training.diagnostics import ACTIVATION_STATS, Diagnostics, activation_stats, layer_name

CONF = Path(__file__).resolve().parents[1] / "conf" / "diagnostics"


class ConvBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(ch, ch, 3, padding=1), nn.BatchNorm2d(ch)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))  # exact zeros: zero_frac has something to count


class TinyNet(nn.Module):
    """stem / blocks.0 / blocks.1 / head, with dropout so that an RNG draw by diagnostics would show."""

    def __init__(self, ch: int = 6, classes: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, ch, 3, padding=1), nn.BatchNorm2d(ch), nn.ReLU())
        self.blocks = nn.Sequential(ConvBlock(ch), ConvBlock(ch))
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(ch, classes)

    def forward(self, x):
        return self.head(self.drop(self.blocks(self.stem(x)).mean((2, 3))))


class TokenBlock(nn.Module):
    """A ViT-like block: (B, N, C) in and out, returning a tuple as some attention blocks do."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        return (torch.relu(self.fc(x)) * torch.arange(1, x.shape[-1] + 1, dtype=x.dtype), None)


class TinyViT(nn.Module):
    def __init__(self, dim: int = 8):
        super().__init__()
        self.blocks = nn.ModuleList([TokenBlock(dim), TokenBlock(dim)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)[0]
        return x.mean()


def _backward(model, seed=0, scale=1.0):
    torch.manual_seed(seed)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    model.zero_grad(set_to_none=True)
    (nn.functional.cross_entropy(model(x), y) * scale).backward()


def _hand_layer_norms(model) -> dict[str, float]:
    squares: dict[str, float] = {}
    for name, p in model.named_parameters():
        squares[layer_name(name)] = squares.get(layer_name(name), 0.0) + float(p.grad.norm()) ** 2
    return {k: math.sqrt(v) for k, v in squares.items()}


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


# ---------------------------------------------------------------- config and naming
def test_yaml_options_instantiate_and_bad_values_name_the_key():
    basic, full = (instantiate(OmegaConf.load(CONF / f"{n}.yaml")) for n in ("basic", "full"))
    assert (basic.every_n_steps, basic.layer_grads, basic.weights, basic.activations) == (50, True, False, False)
    assert (full.layer_grads, full.weights, full.activations) == (True, True, True)
    for kwargs, key in (
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"every_n_steps": True}, "every_n_steps"),
        ({"every_n_steps": "5"}, "every_n_steps"),
        ({"weights": "yes"}, "weights"),
        ({"activations": 1}, "activations"),
    ):
        with pytest.raises(ConfigError, match=rf"^diagnostics\.{key}=.*; use .*diagnostics\.{key}="):
            Diagnostics(**kwargs)


@pytest.mark.parametrize(
    "name, layer",
    [
        ("blocks.3.attn.qkv.weight", "blocks.3"),
        ("stage2.0.conv1.weight", "stage2.0"),
        ("stage2.0.downsample.1.bias", "stage2.0"),
        ("stem.0.weight", "stem"),
        ("stem.conv.weight", "stem"),
        ("stages.1.blocks.2.conv.weight", "stages.1"),
        ("layer3.1.bn2.weight", "layer3.1"),
        ("patch_embed.proj.weight", "patch_embed"),
        ("cls_token", "cls_token"),
        ("head.weight", "head"),
        ("base_model.model.blocks.0.attn.qkv.lora_A.default.weight", "blocks.0"),
        ("base_model.model.head.modules_to_save.default.weight", "head"),
        ("_orig_mod.module.blocks.11.mlp.fc2.bias", "blocks.11"),
        ("0.weight", "0"),
    ],
)
def test_layer_name_rule(name, layer):
    assert layer_name(name) == layer


def test_resnet_layers_are_stem_blocks_head():
    diag = Diagnostics()
    diag.attach(create_model("resnet8", num_classes=10))
    assert diag.layer_names == ["stem", "stage1.0", "stage2.0", "stage3.0", "head"]
    diag.attach(create_model("resnet14", num_classes=10))
    assert diag.layer_names == ["stem", *(f"stage{s}.{b}" for s in (1, 2, 3) for b in (0, 1)), "head"]


@pytest.mark.slow
def test_timm_vit_and_its_peft_lora_wrapper():
    timm, peft = pytest.importorskip("timm"), pytest.importorskip("peft")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=10)
    diag = Diagnostics(every_n_steps=1, weights=True, activations=True)
    diag.attach(vit)
    blocks = [f"blocks.{i}" for i in range(12)]
    assert diag.layer_names == ["cls_token", "pos_embed", "patch_embed", *blocks, "norm", "head"]

    model = peft.get_peft_model(vit, peft.LoraConfig(r=4, target_modules=["qkv"], modules_to_save=["head"]))
    diag.attach(model)
    assert diag.layer_names == [*blocks, "head"]  # only what trains: the adapters and the head
    hooks = _hooks(model)
    diag.before_forward()
    assert _hooks(model) == hooks + 13
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([1, 2])).backward()
    diag.after_backward(1, grad_norm=torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
    opt.step()
    row = diag.after_step(1, epoch=0)
    assert _hooks(model) == hooks
    assert list(row["layers"]) == list(row["activations"]) == [*blocks, "head"]
    # AdamW's first step moves every adapter by ~lr per element: a small, finite, positive ratio everywhere.
    assert all(0 < v["update_ratio"] < 1 and v["grad_norm"] > 0 for v in row["layers"].values())
    assert row["activations"]["blocks.0"]["ch_rms_max"] > row["activations"]["blocks.0"]["rms"] > 0
    json.dumps(row, allow_nan=False)
    final = diag.final_weights(model)["layers"]
    assert list(final) == ["cls_token", "pos_embed", "patch_embed", *blocks, "norm", "head"]
    assert [k for k, v in final.items() if v["trainable"]] == [*blocks, "head"]


# ---------------------------------------------------------------- gradients
def test_layer_grad_norms_and_global_norm_match_hand_computation():
    torch.manual_seed(0)
    model = TinyNet()
    diag = Diagnostics(every_n_steps=1)
    diag.attach(model)
    _backward(model)
    hand = _hand_layer_norms(model)
    diag.after_backward(1)  # no grad_norm: measured here
    row = diag.after_step(1, epoch=3)
    assert (row["kind"], row["step"], row["epoch"]) == ("step", 1, 3)
    assert list(row["layers"]) == ["stem", "blocks.0", "blocks.1", "head"]
    for layer, norm in hand.items():
        assert row["layers"][layer] == {"grad_norm": pytest.approx(norm, rel=1e-6)}
    clipped = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1))
    assert row["grad_norm"] == pytest.approx(clipped, rel=1e-6)
    assert row["grad_norm"] == pytest.approx(math.sqrt(sum(v**2 for v in hand.values())), rel=1e-6)
    assert "activations" not in row and "weight_norm" not in row["layers"]["head"]

    # Still-scaled gradients (a GradScaler without unscale_): inv_scale gives the true norms back.
    _backward(model, scale=1024.0)
    diag.after_backward(2, inv_scale=1 / 1024)
    scaled = diag.after_step(2, epoch=3)
    for layer, norm in hand.items():
        assert scaled["layers"][layer]["grad_norm"] == pytest.approx(norm, rel=1e-5)
    assert scaled["grad_norm"] == pytest.approx(clipped, rel=1e-5)


def test_global_norm_mean_max_over_the_interval_and_nonfinite_steps():
    model = TinyNet()
    diag = Diagnostics(every_n_steps=4, layer_grads=False)
    diag.attach(model)
    _backward(model)
    for step, norm in enumerate([1.0, 3.0, math.inf], start=1):
        diag.after_backward(step, grad_norm=torch.tensor(norm))
        assert diag.after_step(step, epoch=0) is None
    diag.after_backward(4, grad_norm=torch.tensor(2.0))
    row = diag.after_step(4, epoch=0)
    assert row == {
        "kind": "step",
        "step": 4,
        "epoch": 0,
        "grad_norm": 2.0,
        "grad_norm_mean": 2.0,  # (1 + 3 + 2) / 3: the infinite step is counted apart
        "grad_norm_max": 3.0,
        "grad_norm_steps": 3,
        "nonfinite_steps": 1,
    }  # no "layers": neither layer_grads nor weights
    diag.after_backward(5, grad_norm=torch.tensor(7.0))
    diag.after_backward(6)  # not clipping: nothing is measured on a non-logging step
    diag.after_backward(7, grad_norm=torch.tensor(math.nan))
    diag.after_backward(8, grad_norm=5.0)  # a Python float works too
    row = diag.after_step(8, epoch=1)
    assert (row["grad_norm_mean"], row["grad_norm_max"], row["grad_norm_steps"], row["nonfinite_steps"]) == (
        6.0,
        7.0,
        2,
        1,
    )
    diag.after_backward(12, grad_norm=torch.tensor(math.inf))
    row = diag.after_step(12, epoch=1)
    assert (row["grad_norm"], row["grad_norm_mean"], row["grad_norm_max"], row["nonfinite_steps"]) == (
        None,
        None,
        None,
        1,
    )


# ---------------------------------------------------------------- weights
def test_update_ratio_and_weight_norm_around_an_sgd_step():
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    diag = Diagnostics(every_n_steps=1, layer_grads=False, weights=True)
    diag.attach(model)
    _backward(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    diag.after_backward(1)
    opt.step()
    row = diag.after_step(1, epoch=0)
    for layer in ["stem", "blocks.0", "blocks.1", "head"]:
        names = [n for n in before if layer_name(n) == layer]
        after = {n: p.detach() for n, p in model.named_parameters() if n in names}
        delta = math.sqrt(sum(float((after[n] - before[n]).norm()) ** 2 for n in names))
        w_before = math.sqrt(sum(float(before[n].norm()) ** 2 for n in names))
        w_after = math.sqrt(sum(float(after[n].norm()) ** 2 for n in names))
        assert row["layers"][layer] == {
            "weight_norm": pytest.approx(w_after, rel=1e-6),
            "update_ratio": pytest.approx(delta / w_before, rel=1e-5),
        }


def test_final_weights_match_numpy():
    torch.manual_seed(0)
    model = TinyNet()
    model.stem.requires_grad_(False)
    nn.init.zeros_(model.head.weight)
    nn.init.zeros_(model.head.bias)
    with torch.no_grad():
        model.blocks[0].conv.weight[0, 0, 0, 0] = 1e-6  # certainly below 1e-3 * max|w|
    out = Diagnostics().final_weights(model)
    assert out["kind"] == "weights" and list(out["layers"]) == ["stem", "blocks.0", "blocks.1", "head"]
    json.dumps(out, allow_nan=False)
    for layer, stats in out["layers"].items():
        w = np.concatenate([p.detach().numpy().ravel() for n, p in model.named_parameters() if layer_name(n) == layer])
        w = w.astype(np.float64)
        expected_near = 1.0 if not np.abs(w).max() else float(np.mean(np.abs(w) < 1e-3 * np.abs(w).max()))
        assert stats == {
            "trainable": layer != "stem",
            "norm": pytest.approx(np.linalg.norm(w), rel=1e-5),
            "mean": pytest.approx(w.mean(), rel=1e-4, abs=1e-7),
            "std": pytest.approx(w.std(), rel=1e-5),
            "max_abs": pytest.approx(np.abs(w).max(), rel=1e-6),
            "near_zero_frac": pytest.approx(expected_near),
        }
    assert out["layers"]["head"]["near_zero_frac"] == 1.0  # all zero
    assert 0 < out["layers"]["blocks.0"]["near_zero_frac"] < 1


# ---------------------------------------------------------------- activations
def _np_stats(out: torch.Tensor, ch: int) -> dict[str, float]:
    a = out.detach().double().numpy()
    per_channel = np.sqrt(np.mean(np.moveaxis(a, ch, 0).reshape(a.shape[ch], -1) ** 2, axis=1))
    return {
        "mean": a.mean(),
        "std": a.std(),
        "rms": np.sqrt(np.mean(a**2)),
        "zero_frac": np.mean(a == 0),
        "ch_rms_max": per_channel.max(),
    }


def _assert_stats(got: dict, expected: dict):
    assert got == {k: pytest.approx(v, rel=1e-5, abs=1e-6) for k, v in expected.items()}


def test_activation_stats_of_a_channels_last_convnet():
    torch.manual_seed(0)
    model = TinyNet().to(memory_format=torch.channels_last).eval()
    with torch.no_grad():
        model.blocks[1].bn.weight.copy_(torch.arange(1.0, 7.0))  # channels of different scales
    x = torch.randn(4, 3, 8, 8).to(memory_format=torch.channels_last)
    diag = Diagnostics(every_n_steps=5, layer_grads=False, activations=True)
    diag.attach(model)
    hooks = _hooks(model)
    diag.before_forward()
    assert _hooks(model) == hooks + 4  # stem, blocks.0, blocks.1, head
    model(x)
    diag.after_backward(5)
    row = diag.after_step(5, epoch=0)
    assert _hooks(model) == hooks and "layers" not in row
    with torch.no_grad():  # the same outputs, captured by hand
        stem = model.stem(x)
        b0 = model.blocks[0](stem)
        b1 = model.blocks[1](b0)
        head = model.head(b1.mean((2, 3)))
    assert b1.is_contiguous(memory_format=torch.channels_last)
    for layer, out in {"stem": stem, "blocks.0": b0, "blocks.1": b1, "head": head}.items():
        _assert_stats(row["activations"][layer], _np_stats(out, ch=1))
    assert row["activations"]["blocks.1"]["zero_frac"] > 0.2  # after ReLU
    # The channel axis matters: the last (memory) axis of channels_last would give another number.
    assert row["activations"]["blocks.1"]["ch_rms_max"] != pytest.approx(_np_stats(b1, ch=3)["ch_rms_max"])


def test_activation_stats_of_vit_tokens_use_the_last_dim():
    torch.manual_seed(0)
    model = TinyViT()
    x = torch.randn(2, 5, 8)
    diag = Diagnostics(every_n_steps=1, activations=True)
    diag.attach(model)
    diag.before_forward()
    model(x).backward()
    diag.after_backward(1)
    row = diag.after_step(1, epoch=0)
    with torch.no_grad():
        b0 = model.blocks[0](x)[0]
        b1 = model.blocks[1](b0)[0]
    for layer, out in {"blocks.0": b0, "blocks.1": b1}.items():
        _assert_stats(row["activations"][layer], _np_stats(out, ch=2))
    assert row["activations"]["blocks.1"]["ch_rms_max"] != pytest.approx(_np_stats(b1, ch=1)["ch_rms_max"])
    # bf16 activations are accumulated in float32: the same numbers as the upcast tensor's.
    low = b1.bfloat16()
    torch.testing.assert_close(activation_stats(low), activation_stats(low.float()))
    assert activation_stats(low).dtype == torch.float32


def test_hooks_only_on_logging_steps_and_keep_no_graph():
    model = TinyViT()
    diag = Diagnostics(every_n_steps=2, activations=True)
    diag.attach(model)
    diag.before_forward()
    model(torch.randn(2, 5, 8, requires_grad=True)).backward()
    assert all(not t.requires_grad and t.grad_fn is None for t in diag._acts.values())
    diag.after_backward(2)
    diag.after_step(2, epoch=0)
    assert _hooks(model) == 0
    assert diag.after_step(3, epoch=0) is None and _hooks(model) == 0


# ---------------------------------------------------------------- training is unchanged
def _train(diag: Diagnostics | None, steps: int = 6, scaler: bool = False) -> tuple[dict, torch.Tensor, list]:
    """A few steps of the trainer's loop; with ``scaler``: a GradScaler and no clipping, as under fp16."""
    torch.manual_seed(123)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=scaler)
    rows = []
    if diag is not None:
        diag.attach(model)
    for step in range(1, steps + 1):
        x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
        logging = diag is not None and diag.due(step)
        if logging:
            diag.before_forward()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        grad_scaler.scale(loss).backward()
        norm = None
        if not scaler:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        elif logging:
            grad_scaler.unscale_(opt)  # what scaler.step would do anyway: true gradients for the row
        if diag is not None:
            diag.after_backward(step, grad_norm=norm)
        grad_scaler.step(opt)
        grad_scaler.update()
        if diag is not None:
            rows.append(diag.after_step(step, epoch=0))
    return model.state_dict(), torch.get_rng_state(), rows


@pytest.mark.parametrize("scaler", [False, True], ids=["clipped", "gradscaler-unclipped"])
def test_diagnostics_do_not_change_training(scaler):
    plain, rng, _ = _train(None, scaler=scaler)
    full = Diagnostics(every_n_steps=2, layer_grads=True, weights=True, activations=True)
    observed, rng_observed, rows = _train(full, scaler=scaler)
    assert plain.keys() == observed.keys()
    assert all(torch.equal(plain[k], observed[k]) for k in plain)  # bit-identical, BN buffers included
    assert torch.equal(rng, rng_observed)  # no random numbers drawn
    assert [r is not None for r in rows] == [False, True] * 3
    assert all(r["grad_norm_steps"] == (1 if scaler else 2) and {"layers", "activations"} <= set(r) for r in rows if r)
    assert all(0 < r["grad_norm"] < 10 for r in rows if r)  # true norms (~0.5), not 1024x scaled ones


def test_one_host_read_per_row_and_none_between(monkeypatch):
    """On an accelerator every host read is a sync: none between logging steps, one (.tolist) per row."""
    reads: list[tuple[int, str]] = []
    step = 0
    for name in ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__"):

        def spy(self, *args, _name=name, _original=getattr(torch.Tensor, name), **kwargs):
            reads.append((step, _name))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    diag = Diagnostics(every_n_steps=3, weights=True, activations=True)
    diag.attach(model)
    for step in range(1, 7):
        x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
        if diag.due(step):
            diag.before_forward()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        diag.after_backward(step, grad_norm=torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.step()
        diag.after_step(step, epoch=0)
    monkeypatch.undo()
    assert reads == [(3, "tolist"), (6, "tolist")]


def test_hooks_that_never_fire_give_none_and_one_warning():
    """What a torch.compile'd forward does with hooks added after compilation (with dynamo's default guards)."""
    model = TinyViT()
    diag = Diagnostics(every_n_steps=1, activations=True)
    diag.attach(model)
    for step in (1, 2):
        diag.before_forward()  # ... and no eager forward sees them
        with pytest.warns(RuntimeWarning, match="skip_nnmodule_hook_guards") if step == 1 else _no_warning():
            row = diag.after_step(step, epoch=0)
        assert row["activations"] == {b: dict.fromkeys(ACTIVATION_STATS) for b in ("blocks.0", "blocks.1")}


@contextlib.contextmanager
def _no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_one_tag_family_per_statistic_for_trackers_and_the_analysis(tmp_path):
    """The logging steps' per-layer weight_norm and the final weights' norm share one name (TensorBoard showed both
    ``weight_norm`` and ``weights_norm``); the analysis reads the unchanged file under the same names."""
    from stackwise_bench.analysis.read.diagnostics import collect_diagnostics
    from stackwise_bench.runs.tracking import by_statistic

    step = {"kind": "step", "step": 2, "epoch": 1, "grad_norm": 1.0, "layers": {"head": {"weight_norm": 3.0}}}
    final = {"kind": "weights", "step": 4, "layers": {"head": {"trainable": True, "norm": 3.5, "std": 0.1}}}
    assert by_statistic(step) == {"step": 2, "grad_norm": 1.0, "weight_norm/head": 3.0}
    assert by_statistic(final) == {
        "step": 4,
        "weight_trainable/head": True,
        "weight_norm/head": 3.5,
        "weight_std/head": 0.1,
    }
    families = {key.split("/")[0] for row in (step, final) for key in by_statistic(row) if "/" in key}
    assert "weights_norm" not in families and "weight_norm" in families
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "diagnostics.jsonl").write_text(json.dumps(step) + "\n" + json.dumps(final) + "\n")
    import pandas as pd

    runs = pd.DataFrame({"run_dir": [str(run_dir)], "status": ["completed"]})
    runs.attrs["override_keys"] = []
    table = collect_diagnostics(runs).set_index(["kind", "layer", "metric"])["value"]
    assert table[("step", "head", "weight_norm")] == 3.0 and table[("weights", "head", "weight_norm")] == 3.5
