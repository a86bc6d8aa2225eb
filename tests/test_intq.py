"""Integer post-training quantization (int8 per channel, int4 per group): exact codes, bounded error, packed bytes."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from torch import nn

from stackwise_bench.errors import ConfigError
from stackwise_bench.nn.models import create_model
from stackwise_bench.quant.intq import fp16_ceil, packed_bytes, quantize_int4, quantize_int8
from stackwise_bench.quant.ptq import quantize_model

EPS = 1e-6  # how close w' / scale must be to an integer code


def weights() -> list[torch.Tensor]:
    """A Linear weight with a zero row and rows spanning 6 decades, an all-positive one, and a Conv weight."""
    gen = torch.Generator().manual_seed(0)
    lin = torch.randn(12, 70, generator=gen) * torch.logspace(-3, 3, 12).view(-1, 1)
    lin[0] = 0.0
    lin[1] = lin[1].abs() + 0.5  # no 0 inside the row's range
    conv = torch.randn(6, 3, 3, 3, generator=gen) * 0.05
    return [lin, conv, torch.randn(5, 33, generator=gen)]


def near_integers(x: torch.Tensor) -> torch.Tensor:
    return (x - x.round()).abs() <= EPS


@pytest.mark.parametrize("w", weights(), ids=["linear", "conv", "plain"])
def test_int8_codes_are_exact_and_the_error_is_half_a_scale(w):
    deq, scale, q = quantize_int8(w)
    assert deq.shape == w.shape and scale.shape == (w.shape[0], 1) and q.dtype == torch.int8
    assert torch.equal(scale.half().float(), scale) and (scale > 0).all()  # stored as fp16, used as stored
    rows, drows = w.reshape(w.shape[0], -1), deq.reshape(w.shape[0], -1)
    codes = drows / scale
    assert near_integers(codes).all() and (codes.round().abs() <= 127).all()
    assert torch.equal(codes.round(), q.float())
    amax = rows.abs().amax(1)
    top = codes.round().gather(1, rows.abs().argmax(1, keepdim=True)).squeeze(1)
    nonzero = amax > 0
    assert (top[nonzero].abs() == 127).all()  # the largest magnitude of each channel maps to ±127
    assert torch.equal(scale[~nonzero], torch.ones_like(scale[~nonzero])) and (drows[~nonzero] == 0).all()
    assert ((rows - drows).abs() <= scale / 2).all()
    # the scale is amax / 127 rounded up to fp16: at most one fp16 step (2**-10 relative) above it
    want = amax / 127
    assert ((scale.squeeze(1)[nonzero] >= want[nonzero]) & (scale.squeeze(1)[nonzero] <= want[nonzero] * 1.001)).all()


def int4_codes(w: torch.Tensor, group_size: int):
    """Per element: the dequantized value, its group's scale and zero point (expanded over each row)."""
    deq, scale, zero, q = quantize_int4(w, group_size)
    rows = w.reshape(w.shape[0], -1)
    n = rows.shape[1]
    assert scale.shape == zero.shape == (w.shape[0], math.ceil(n / group_size)) and q.shape == rows.shape
    col = torch.arange(n) // group_size
    return rows, deq.reshape(rows.shape), scale[:, col], zero[:, col].float(), q


@pytest.mark.parametrize("w", weights(), ids=["linear", "conv", "plain"])
@pytest.mark.parametrize("group_size", [32, 8, 5])
def test_int4_codes_are_exact_and_the_error_is_half_a_scale(w, group_size):
    rows, deq, scale, zero, q = int4_codes(w, group_size)
    assert torch.equal(scale.half().float(), scale) and (scale > 0).all()
    assert ((zero >= 0) & (zero <= 15) & (zero == zero.round())).all()
    codes = deq / scale + zero  # w' = scale * (q - z)
    assert near_integers(codes).all()
    assert ((codes.round() >= 0) & (codes.round() <= 15)).all() and torch.equal(codes.round(), q.float())
    assert ((rows - deq).abs() <= scale / 2 * (1 + 1e-6)).all()


def test_int4_constant_groups_and_a_short_last_group():
    w = torch.randn(4, 70, generator=torch.Generator().manual_seed(1))
    w[0, :32] = 0.375  # constant groups: an fp16 value, negative, zero
    w[1, 32:64] = -1.5
    w[2, :32] = 0.0
    w[3, 64:] = 2.25  # the short last group (70 = 32 + 32 + 6) is constant too
    rows, deq, scale, zero, _ = int4_codes(w, 32)
    for r, cols in ((0, slice(0, 32)), (1, slice(32, 64)), (2, slice(0, 32)), (3, slice(64, 70))):
        assert torch.equal(deq[r, cols], w[r, cols])  # exactly
    # a constant that is no fp16 value comes back as its fp16 rounding (the stored scale's precision)
    odd = torch.full((1, 32), 0.1)
    assert torch.equal(quantize_int4(odd, 32)[0], odd.half().float())
    # a short last group is quantized exactly as if it stood alone: padding changed nothing
    v = torch.randn(3, 70, generator=torch.Generator().manual_seed(2))
    alone = quantize_int4(v[:, 64:].contiguous(), 32)
    full = quantize_int4(v, 32)
    assert torch.equal(full[0][:, 64:], alone[0])
    assert torch.equal(full[1][:, 2], alone[1][:, 0]) and torch.equal(full[2][:, 2], alone[2][:, 0])


def test_fp16_ceil_rounds_up_and_never_to_zero():
    x = torch.tensor([1e-12, 6e-8, 0.1, 1.0, 1 + 2**-12, 7e4])
    up = fp16_ceil(x)
    assert torch.equal(up.half().float(), up)
    assert (up[:-1] >= x[:-1]).all() and up[0] > 0 and up[-1] == 65504.0
    assert up[3] == 1.0 and up[4] == 1 + 2**-10


def int_bytes(shape, fmt: str, group_size: int) -> int:
    """The formula, written out again: codes + fp16 scales (+ 4-bit zero points, packed per tensor)."""
    out, numel = shape[0], math.prod(shape)
    if fmt == "int8":
        return numel * 1 + out * 2
    groups = out * math.ceil((numel // out) / group_size)
    return math.ceil(numel * 4 / 8) + groups * 2 + math.ceil(groups * 4 / 8)


@pytest.mark.parametrize("fmt,group_size", [("int8", 32), ("int4", 32), ("int4", 5)])
def test_packed_bytes_of_a_small_model(fmt, group_size):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 7, 3), nn.Flatten(), nn.Linear(7 * 4 * 4, 9), nn.ReLU(), nn.Linear(9, 3))
    shapes = [(7, 3, 3, 3), (9, 112), (3, 9)]
    assert [tuple(m.weight.shape) for m in model if hasattr(m, "weight")] == shapes
    assert [packed_bytes(s, fmt, group_size) for s in shapes] == [int_bytes(s, fmt, group_size) for s in shapes]
    if (
        fmt == "int4" and group_size == 5
    ):  # 189 weights in 7 rows of 27: 6 groups each, 95 code bytes (one nibble spare)
        assert packed_bytes((7, 3, 3, 3), "int4", 5) == 95 + 42 * 2 + 21
    total = sum(p.numel() for p in model.parameters()) * 4
    _, report = quantize_model(model, fmt, keep_head=False, head=[], group_size=group_size)
    packed = sum(int_bytes(s, fmt, group_size) for s in shapes)
    assert report["quantized_weight_bytes_before"] == sum(math.prod(s) for s in shapes) * 4
    assert report["quantized_weight_bytes_after"] == packed
    assert report["weight_bytes_before"] == total
    assert report["weight_bytes_after"] == total - report["quantized_weight_bytes_before"] + packed


def resnet8() -> nn.Module:
    torch.manual_seed(0)
    return create_model("resnet8", 10, pretrained=False).eval()


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantize_model_reports_consistent_numbers(fmt):
    model = resnet8()
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x)
    model, r = quantize_model(model, fmt)
    assert r["format"] == fmt and r["scale"] == "float16" and r["kept_high_precision"] == ["head"]
    assert (r["bits"], r["granularity"], r["group_size"]) == (
        (8, "per_output_channel", None) if fmt == "int8" else (4, "group_32", 32)
    )
    assert "fmax" not in r
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in r["layers"]}
    assert r["quantized_weight_bytes_after"] == sum(int_bytes(s, fmt, 32) for s in shapes.values())
    assert r["compression"] == pytest.approx(r["weight_bytes_before"] / r["weight_bytes_after"])
    assert r["weight_bytes_before"] - r["weight_bytes_after"] == (
        r["quantized_weight_bytes_before"] - r["quantized_weight_bytes_after"]
    )
    err = {n: (model.get_submodule(n).weight.detach() - original[n]).square().sum() for n in r["layers"]}
    ref_sq = {n: original[n].square().sum() for n in r["layers"]}
    assert r["weight_rel_error"] == pytest.approx(float((sum(err.values()) / sum(ref_sq.values())).sqrt()), rel=1e-4)
    rel = {n: float((err[n] / ref_sq[n]).sqrt()) for n in r["layers"]}
    assert r["worst_layer"] == max(rel, key=rel.get) and r["worst_layer_rel_error"] == pytest.approx(
        rel[r["worst_layer"]]
    )
    assert torch.equal(model.head.weight, original["head"])
    with torch.no_grad():
        logits_err = float((model(x) - ref).norm() / ref.norm())
    if fmt == "int8":  # 0.7% weight error: the logits move by well under 5% (measured 0.9%)
        assert r["compression"] > 3.5 and r["weight_rel_error"] < 0.01 and logits_err < 0.05
    else:  # 8% weight error for 6.3x compression (measured logits error 8%)
        assert r["compression"] > 5.5 and r["weight_rel_error"] < 0.15 and logits_err < 0.3


def test_refusals_are_one_sentence():
    for call, says in (
        (lambda: quantize_model(nn.Linear(4, 4), "int3", keep_head=False), r"^quantize=int3 is not a supported format"),
        (
            lambda: quantize_model(nn.Linear(4, 4), "int8", keep_head=False, activations=True),
            r"^activations=true applies to the FP8 formats only \(quantize=int8 is weight-only integer quantization\); "
            r"drop activations, or use quantize=fp8_e4m3",
        ),
        (lambda: quantize_model(nn.Linear(4, 4), "int4", group_size=0), r"^group_size=0 must be a positive integer"),
        (lambda: quantize_int4(torch.ones(2, 4), True), r"^group_size=True must be a positive integer"),
        (lambda: quantize_int4(torch.ones(2, 4), 2.5), r"^group_size=2\.5 must be a positive integer"),
    ):
        with pytest.raises(ConfigError, match=says) as info:
            call()
        message = str(info.value)
        assert "\n" not in message and message.endswith(".")


# ------------------------------------------------------------------------------------------- end to end

TINY_RUN = ["trainer.max_epochs=2", "monitors=none", "dataset.num_test=256"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny finished resnet8 run on the synthetic set (a few seconds), in a study folder of its own."""
    from stackwise_bench.train import run

    from conftest import compose

    run_dir = tmp_path_factory.mktemp("intq") / "AugmFP16" / "seed=42"
    summary = run(compose(TINY_RUN), run_dir, overrides=TINY_RUN)
    assert summary["status"] == "completed"
    return run_dir


@pytest.mark.slow
def test_evaluate_checkpoint_with_integer_weights(trained):
    from stackwise_bench.evaluation import evaluate_checkpoint

    s8 = evaluate_checkpoint(trained, quantize="int8")
    s4 = evaluate_checkpoint(trained, quantize="int4")
    s16 = evaluate_checkpoint(trained, quantize="int4", group_size=16)
    assert [s["run"]["name"] for s in (s8, s4, s16)] == ["best_int8", "best_int4_g32", "best_int4_g16"]
    assert "group_size" not in s8["run"] and s4["run"]["group_size"] == 32 and s16["run"]["group_size"] == 16
    for s in (s8, s4, s16):
        base, drop, q = s["baseline"], s["degradation"], s["quantize"]
        assert s["status"] == "completed" and base["matches_recorded"] is True
        assert drop["top1_points"] == pytest.approx(base["top1"] - s["test"]["top1"])
        assert q["compression"] == pytest.approx(q["weight_bytes_before"] / q["weight_bytes_after"])
    assert s8["degradation"]["top1_points"] <= 2.0  # int8 weights: "only a little"
    assert s16["quantize"]["granularity"] == "group_16"
    assert s16["quantize"]["weight_bytes_after"] > s4["quantize"]["weight_bytes_after"]  # more scales
    assert s16["quantize"]["weight_rel_error"] < s4["quantize"]["weight_rel_error"]  # finer groups
    with pytest.raises(ConfigError, match=r"^group_size=64 only applies to quantize=int4 \(not quantize=int8\)"):
        evaluate_checkpoint(trained, quantize="int8", group_size=64)
    with pytest.raises(ConfigError, match=r"^activations=true applies to the FP8 formats only"):
        evaluate_checkpoint(trained, quantize="int4", activations=True)
    with pytest.raises(ConfigError, match=r"^group_size=0 must be a positive integer"):
        evaluate_checkpoint(trained, quantize="int4", group_size=0)


@pytest.mark.slow
def test_the_analysis_lists_int_formats_beside_fp8(trained, tmp_path):
    from stackwise_bench.analysis import analyze_runs, write_report
    from stackwise_bench.evaluation import evaluate_checkpoint

    run = shutil.copytree(trained, tmp_path / "AugmFP16" / "seed=42", ignore=shutil.ignore_patterns("eval"))
    for fmt in ("int8", "int4", "fp8_e4m3"):
        evaluate_checkpoint(run, quantize=fmt)
    a = analyze_runs(run.parent)
    t = a.quantization.set_index("quantize")
    assert sorted(t.index) == ["fp8_e4m3", "int4", "int8"]
    assert t.loc["int4", "group_size"] == 32 and t[["group_size"]].isna().sum().item() == 2
    md = (write_report(a, tmp_path / "analysis", plots=False) / "report.md").read_text()
    assert "## Post-training quantization" in md and "## FP8 post-training quantization" not in md
    section = md[md.index("## Post-training quantization") :]
    for label in ("| fp8_e4m3 |", "| int8 |", "| int4_g32 |"):
        assert label in section
