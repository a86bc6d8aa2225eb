"""lora.method: every PEFT method composes, trains and records exact parameter counts; AdaLoRA done right.

Counts are checked against formulas computed here from the layer shapes (not from peft), on a 2-block ViT
(vit_micro_p4: width 64, qkv 64 -> 192) with the method's default targets (every block's qkv).
"""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

from stackwise_bench.errors import ConfigError
from stackwise_bench.evaluation import evaluate_checkpoint
from stackwise_bench.nn.models import create_model
from stackwise_bench.train import run

from conftest import compose

# 80 synthetic images: 72 train after the 10% validation split, batch 32 with drop_last -> 2 steps.
TWO_STEPS = [
    "model=vit_micro_p4",
    "dataset=synthetic",
    "dataset.num_train=80",
    "dataset.num_test=32",
    "trainer.device=cpu",
    "trainer.max_epochs=1",
    "trainer.batch_size=32",
    "trainer.progress=log",
    "monitors=none",
]
CLASSES = 4  # the synthetic set's default
RANK = 4


def balanced_factors(n: int) -> tuple[int, int]:
    """``(a, n // a)`` with ``a`` the largest divisor of ``n`` not above sqrt(n): LoKr's Kronecker split."""
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return a, n // a


def adapter_formula(method: str, d_in: int, d_out: int, r: int) -> int:
    """Trainable adapter parameters of one adapted Linear(d_in -> d_out), from the method's definition."""
    if method in ("lora", "rslora", "pissa", "qlora"):
        return r * (d_in + d_out)  # A: r x in, B: out x r
    if method == "dora":
        return r * (d_in + d_out) + d_out  # + one magnitude per output feature
    if method == "adalora":
        r0 = math.ceil(1.5 * r)  # init_r: the budget starts 1.5x the target
        return r0 * (d_in + d_out + 1)  # P, Q and the r0 singular values
    if method == "loha":
        return 2 * r * (d_in + d_out)  # two LoRA-shaped pairs, Hadamard-multiplied
    if method == "lokr":
        in_a, in_b = balanced_factors(d_in)
        out_a, out_b = balanced_factors(d_out)
        w1 = out_a * in_a  # the small Kronecker factor, full
        w2 = r * (out_b + in_b) if r < max(out_b, in_b) / 2 else out_b * in_b  # the large one, low-rank if it pays
        return w1 + w2
    if method == "ia3":
        return d_out  # one scale per output
    if method == "vera":
        return r + d_out  # lambda_d (r) and lambda_b (out); the random A, B are frozen and shared
    if method == "oft":
        b = 8  # lora.oft.block_size
        return (d_in // b) * b * (b - 1) // 2  # a skew-symmetric b x b generator per input block
    if method == "qalora":
        g = 32  # lora.qalora.group_size
        return r * (d_in // g) + d_out * r  # A sees the input averaged per quantization group
    raise AssertionError(method)


@pytest.fixture(scope="module")
def micro_shape():
    model = create_model("vit_micro_p4", num_classes=CLASSES)
    qkv = model.blocks[0].attn.qkv
    return {"d_in": qkv.in_features, "d_out": qkv.out_features, "blocks": len(model.blocks), "d": model.embed_dim}


METHODS = ["lora", "dora", "rslora", "pissa", "adalora", "loha", "lokr", "ia3", "vera", "oft", "qalora", "qlora"]


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_records_exact_counts(method, micro_shape, tmp_path):
    summary = run(compose([*TWO_STEPS, f"lora.method={method}", f"lora.rank={RANK}"], tiny=False), tmp_path / method)
    assert summary["status"] == "completed", summary.get("error")
    assert summary["train"]["steps"] == 2
    rows = [json.loads(line) for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and math.isfinite(rows[-1]["train_loss"])

    s = micro_shape
    adapter = s["blocks"] * adapter_formula(method, s["d_in"], s["d_out"], RANK)
    head = s["d"] * CLASSES + CLASSES
    assert summary["params"]["adapter"] == adapter
    assert summary["params"]["trainable"] == adapter + head
    assert summary["adapter"]["method"] == method and summary["adapter"]["layers"] == s["blocks"]
    assert summary["adapter"]["rank"] == (None if method in ("ia3", "oft") else RANK)


def test_adapters_are_what_trains(tmp_path):
    """Two steps move the adapters and the head, and nothing else (the frozen base stays bit for bit)."""
    from stackwise_bench.build import build_model

    cfg = compose([*TWO_STEPS, "lora.method=dora", f"lora.rank={RANK}"], tiny=False)
    torch.manual_seed(0)
    model, _, _ = build_model(cfg, CLASSES)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        x, y = torch.randn(8, 3, 8, 8), torch.randint(0, CLASSES, (8,))
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(("lora_" in n or ".head." in n) for n in changed)
    assert any("lora_magnitude_vector" in n for n in changed)


# ------------------------------------------------------------------------------------------------ AdaLoRA
# 600 synthetic images: 540 train, 16 steps per epoch at batch 32; 3 epochs = 48 steps, tinit 4, tfinal 9.
ADALORA = [
    "model=vit_micro_p4",
    "dataset=synthetic",
    "dataset.num_train=600",
    "dataset.num_test=32",
    "trainer.device=cpu",
    "trainer.max_epochs=3",
    "trainer.batch_size=32",
    "trainer.progress=log",
    "trainer.early_stopping_patience=null",
    "monitors=none",
    "lora.method=adalora",
    "lora.rank=2",
    "lora.adalora.delta_t=3",
    "optimizer.lr=0.01",
]


def rank_rows(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "diagnostics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") == "adapter_ranks"]


@pytest.fixture(scope="module")
def adalora_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("adalora") / "full"
    return run_dir, run(compose(ADALORA, tiny=False), run_dir)


@pytest.mark.slow
def test_adalora_schedule_spans_the_real_run(adalora_run):
    _, summary = adalora_run
    steps = 3 * (540 // 32)
    assert summary["adapter"]["total_step"] == steps  # the trainer's count, not a guess
    assert (summary["adapter"]["tinit"], summary["adapter"]["tfinal"]) == (steps // 10, steps // 5)


def test_adalora_ranks_change_and_are_recorded(adalora_run):
    run_dir, summary = adalora_run
    rows = rank_rows(run_dir)
    budgets = [r["rank_budget"] for r in rows]
    init_r, layers = math.ceil(1.5 * 2), 2
    assert budgets[0] == init_r * layers  # step 1: every layer at init_r
    assert len(set(budgets)) > 1 and budgets == sorted(budgets, reverse=True)  # the cubic schedule only prunes
    final = summary["adapter"]["final_ranks"]
    assert set(final) == {"blocks.0.attn.qkv", "blocks.1.attn.qkv"}
    assert sum(final.values()) == summary["adapter"]["rank_budget"] == 2 * layers  # target_r per layer on average
    assert {k: v["rank"] for k, v in rows[-1]["layers"].items()} == final
    assert summary["test"]["top1"] >= 0


@pytest.mark.slow
def test_adalora_resume_is_bit_identical(adalora_run, tmp_path, monkeypatch):
    """SIGINT inside the pruning window (step 20 of 48); the resumed run ends with the same numbers and ranks."""
    full_dir, full = adalora_run
    calls = {"n": 0}
    original = torch.optim.lr_scheduler.LambdaLR.step

    def step_then_signal(self, *args, **kwargs):
        original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1 + 20:  # LambdaLR steps once when it is built
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "step", step_then_signal)
    run_dir = tmp_path / "killed"
    assert run(compose(ADALORA, tiny=False), run_dir)["status"] == "interrupted"
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["adapter"]["exp_avg_ipt"]  # the importance scores travel with the checkpoint
    monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "step", original)

    resumed = run(compose([*ADALORA, "trainer.resume=true"], tiny=False), run_dir)
    assert resumed["status"] == "completed" and resumed["run"]["resumed"]
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith("time_s") and k != "train_img_s"} for r in rows]  # noqa: E731
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    full_metrics = [json.loads(line) for line in (full_dir / "metrics.jsonl").read_text().splitlines()]
    assert strip(metrics) == strip(full_metrics)
    assert resumed["adapter"]["final_ranks"] == full["adapter"]["final_ranks"]
    assert rank_rows(run_dir) == rank_rows(full_dir)
    assert resumed["test"]["confusion_matrix"] == full["test"]["confusion_matrix"]


def test_adalora_schedule_without_room_is_refused_with_its_numbers(tmp_path):
    cfg = compose([*TWO_STEPS, "lora.method=adalora", "lora.rank=4", "lora.adalora.tinit=5"], tiny=False)
    with pytest.raises(ConfigError) as err:
        run(cfg, tmp_path / "r")
    assert str(err.value) == (
        "lora.adalora.tinit=5 and lora.adalora.tfinal=0 leave no steps to reallocate ranks in a run of 2 optimizer "
        "steps (AdaLoRA needs tinit < 2 - tfinal); lower them, e.g. lora.adalora.tinit=0 lora.adalora.tfinal=0, "
        "or train longer."
    )
    assert not (tmp_path / "r" / "metrics.jsonl").exists() or not (tmp_path / "r" / "metrics.jsonl").read_text()


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (
            ["model=resnet8", "lora.method=vera"],
            r"^lora\.method=vera cannot be built on resnet8 with lora\.target_modules='stage\\\\d\+.*"
            r"VeRA adapts nn\.Linear layers only: use a ViT/DeiT model or another lora\.method\.$",
        ),
        (
            ["model=resnet8", "lora.method=qalora"],
            r"^lora\.target_modules.*Conv2d",
        ),
        (
            ["lora.method=oft", "lora.oft.block_size=24"],
            r"^lora\.oft\.block_size=24 does not divide the input size 64 of blocks\.0\.attn\.qkv .*"
            r"lora\.oft\.block_size=16\.$",
        ),
        (["lora.method=qalora", "lora.qalora.group_size=48"], r"^lora\.qalora\.group_size=48"),
    ],
)
def test_methods_a_model_cannot_take_are_refused_in_one_sentence(overrides, pattern, tmp_path):
    cfg = compose([*TWO_STEPS, f"lora.rank={RANK}", *overrides], tiny=False)
    with pytest.raises(ConfigError, match=pattern) as err:
        run(cfg, tmp_path / "r")
    assert str(err.value).count(". ") <= 1 and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "lora.method=lorra",
            "lora.method=lorra must be one of lora, dora, rslora, pissa, adalora, loha, lokr, ia3, vera, oft, "
            "qalora, qlora; use e.g. lora.method=dora.",
        ),
        ("lora.qalora.bits=3", "lora.qalora.bits=3 must be 4 or 8; use e.g. lora.qalora.bits=4."),
        (
            "lora.target_modules='blocks.(qkv'",
            "lora.target_modules=blocks.(qkv is not a valid regular expression (missing ), unterminated subpattern "
            r"at position 7); escape the dots, e.g. lora.target_modules='blocks\.\d+\.attn\.qkv', or give a list of "
            "names like [qkv].",
        ),
    ],
)
def test_bad_method_knobs_are_refused_before_building(override, message, tmp_path):
    with pytest.raises(ConfigError) as err:
        run(compose([*TWO_STEPS, "lora.rank=4", override], tiny=False), tmp_path / "r")
    assert str(err.value) == message


# ------------------------------------------------------------------------------------- QA-LoRA end to end
def test_qalora_run_records_and_evaluates_the_merged_integer_model(tmp_path):
    run_dir = tmp_path / "qa"
    summary = run(compose([*TWO_STEPS, "lora.method=qalora", "lora.rank=4"], tiny=False), run_dir)
    merged = summary["adapter"]["merged"]
    assert merged["on_grid"] and merged["bits"] == 4 and merged["group_size"] == 32 and merged["layers"] == 2
    one_image = 100.0 / 32
    assert abs(merged["top1"] - summary["test"]["top1"]) <= one_image  # the merge moves weights by fp16 rounding

    ev = evaluate_checkpoint(run_dir)  # the evaluate entrypoint measures what deploys: the merged model
    assert ev["merge"]["on_grid"] and ev["unmerged"]["top1"] == summary["test"]["top1"]
    assert ev["test"]["top1"] == merged["top1"]
