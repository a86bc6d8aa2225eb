"""Training regimes (stackwise_bench.training.regime): plans, growth during training, optimizer/scheduler surgery,
stackwise learning rates, rewarm, bit-identical resume and refusals."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from stackwise_bench.errors import ConfigError
from stackwise_bench.nn.growth import depth_of, growth_sources
from stackwise_bench.nn.models import create_model
from stackwise_bench.training.optim import build_optimizer, build_scheduler, param_groups
from stackwise_bench.training.regime import Classical, DepthTime

LR, WD, TOTAL = 1e-2, 0.05, 12


def vit(depth: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(
        "vit_micro_p4",
        10,
        pretrained=False,
        img_size=8,
        patch_size=4,
        embed_dim=32,
        depth=depth,
        num_heads=2,
        mlp_ratio=2.0,
        global_pool="avg",
        class_token=False,
    )


def resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("resnet14", 10, pretrained=False)  # 2 blocks per stage


def build(model, regime, optimizer="adamw", scheduler="cosine", total=TOTAL):
    """What build.py does for a run: setup (truncate), optimizer, scheduler, plan."""
    regime.setup(model)
    impl = "fused" if optimizer == "adamw" else "foreach"
    opt = build_optimizer(model, optimizer, LR, WD, implementation=impl)
    sched = build_scheduler(opt, scheduler, steps_per_epoch=total, max_epochs=1, warmup_epochs=0.25)  # 3 steps
    regime.plan(total)
    return opt, sched


def batch(step: int, model) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    size = 8 if hasattr(model, "blocks") else 32
    return torch.randn(4, 3, size, size, generator=g), torch.randint(0, 10, (4,), generator=g)


def train(model, regime, opt, sched, start: int, stop: int, record=None) -> list[float]:
    """The trainer's loop: regime.before_step first, then forward, zero_grad, backward, step, scheduler.step."""
    losses = []
    for step in range(start, stop):
        info = regime.before_step(step, model, opt, sched)
        if record is not None:
            record(step, info)
        x, y = batch(step, model)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses


def check_groups(model, opt) -> None:
    """Every parameter of the model in exactly one group, nothing else in any."""
    held = [p for group in opt.param_groups for p in group["params"]]
    assert len({id(p) for p in held}) == len(held)
    assert {id(p) for p in held} == {id(p) for p in model.parameters()}


def named(model) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


# ---------------------------------------------------------------------------------------------------- the plan


def test_setup_truncates_and_plan_places_the_stages():
    model, regime = vit(), DepthTime([1, 2, 4], [0.25, 0.5])
    regime.setup(model)
    assert depth_of(model) == 1
    assert regime.plan(TOTAL) == [3, 6] and regime.growth_steps == [3, 6]
    assert [regime.stage_at(s) for s in range(TOTAL)] == [0] * 3 + [1] * 3 + [2] * 6
    assert [regime.depth_at(i) for i in range(3)] == [1, 2, 4]
    assert DepthTime([1, 2], [0.375]).plan(12) == [5]  # 4.5 rounds half up (Python's round() would give 4)
    assert DepthTime([1, 2], [0.37]).plan(12) == [4]
    model = resnet()
    DepthTime([1, 2], [0.5], init="identity").setup(model)
    assert [len(s) for s in (model.stage1, model.stage2, model.stage3)] == [1, 1, 1]


def test_classical_is_a_no_op():
    model = vit()
    regime = Classical()
    regime.setup(model)
    opt, sched = build_optimizer(model, "adamw", LR, WD), None
    groups = [list(g["params"]) for g in opt.param_groups]
    assert regime.plan(TOTAL) == [] and regime.stage_at(5) == 0 and regime.lr_multiplier(5) == 1.0
    assert regime.before_step(5, model, opt, sched) is None
    regime.replay(0, model, opt, sched)
    assert depth_of(model) == 4 and [list(g["params"]) for g in opt.param_groups] == groups
    assert regime.describe() == {"regime": "classical"} and regime.state_dict() == {"stage": 0}


# ------------------------------------------------------------------------------------------ growth while training


@pytest.mark.parametrize("mode", ["append", "prepend", "interleave"])
@pytest.mark.parametrize(
    "family, optimizer, init",
    [("vit", "adamw", "copy"), ("vit", "sgd", "random"), ("resnet", "adamw", "identity"), ("resnet", "sgd", "random")],
)
def test_training_grows_on_plan_and_trains_the_new_blocks(family, optimizer, init, mode):
    model = vit() if family == "vit" else resnet()
    stacks = [1, 2, 4] if family == "vit" else [1, 2]
    regime = DepthTime(stacks, [0.25, 0.5][: len(stacks) - 1], mode, init)
    opt, sched = build(model, regime, optimizer)
    new, infos = {}, {}

    def record(step, info):
        assert depth_of(model) == regime.depth_at(regime.stage_at(step))
        if info is not None:
            infos[step] = info
            new.update({k: named(model)[k].detach().clone() for k in regime.last_growth.new})
            check_groups(model, opt)

    losses = train(model, regime, opt, sched, 0, TOTAL, record)
    assert all(math.isfinite(loss) for loss in losses)
    plan = regime.growth_steps
    assert sorted(infos) == plan and depth_of(model) == stacks[-1]
    assert infos[plan[0]] == {"stage": 1, "depth": 2, "step": plan[0], "new_params": len(new) if len(plan) == 1 else 12}
    check_groups(model, opt)
    for got, want in zip(opt.param_groups, param_groups(model, WD)):  # rackwise: the build_optimizer layout
        assert got["params"] == want["params"] and got["weight_decay"] == want["weight_decay"]
    params = named(model)
    assert new and all(not torch.equal(params[k], v) for k, v in new.items()), "a new parameter never moved"


def test_a_late_call_applies_every_due_growth_in_order():
    model, regime = vit(), DepthTime([1, 2, 4], [0.25, 0.5], "interleave", "random")
    opt, sched = build(model, regime)
    info = regime.before_step(7, model, opt, sched)
    assert info == {"stage": 2, "depth": 4, "step": 7, "new_params": 36}
    assert regime.stage == 2 and depth_of(model) == 4
    check_groups(model, opt)
    assert regime.before_step(8, model, opt, sched) is None


def test_growth_randomness_comes_from_the_regime_seed():
    def grown(seed: int, global_seed: int) -> dict:
        model, regime = vit(), DepthTime([2, 4], [0.5], "append", "random", seed=seed)
        opt, sched = build(model, regime)
        torch.manual_seed(global_seed)
        regime.before_step(6, model, opt, sched)
        return {k: named(model)[k].detach().clone() for k in regime.last_growth.new}

    a, b, c = grown(0, 1), grown(0, 2), grown(1, 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.2.attn.qkv.weight"], c["blocks.2.attn.qkv.weight"])


# ------------------------------------------------------------------------------------------------ optimizer state


def _sources(mode: str) -> dict[str, str]:
    """New block -> source block names for a ViT grown 2 -> 4 (names after growth)."""
    layout = growth_sources(2, 4, mode)
    where = {i: pos for pos, (i, is_new) in enumerate(layout) if not is_new}
    return {f"blocks.{pos}.": f"blocks.{where[i]}." for pos, (i, is_new) in enumerate(layout) if is_new}


@pytest.mark.parametrize(
    "optimizer, keys", [("adamw", {"step", "exp_avg", "exp_avg_sq"}), ("sgd", {"momentum_buffer"})]
)
@pytest.mark.parametrize("mode", ["append", "prepend", "interleave"])
def test_optimizer_state_is_copied_from_the_sources(mode, optimizer, keys):
    model, regime = vit(), DepthTime([2, 4], [0.5], mode, "copy", optimizer_state="copy")
    opt, sched = build(model, regime, optimizer)
    train(model, regime, opt, sched, 0, 6)
    old = {id(p): opt.state[p] for p in model.parameters()}
    regime.before_step(6, model, opt, sched)
    params = named(model)
    assert all(opt.state[params[k]] is old[id(params[k])] for k in regime.last_growth.renamed.values())
    prefixes = _sources(mode)
    assert len(regime.last_growth.copied) == 24
    for name, source in regime.last_growth.copied.items():
        prefix = next(p for p in prefixes if name.startswith(p))
        assert source == prefixes[prefix] + name[len(prefix) :]
        mine, theirs = opt.state[params[name]], opt.state[params[source]]
        assert set(mine) == keys == set(theirs)
        for key in keys:
            assert torch.equal(mine[key], theirs[key]), key
            assert mine[key].data_ptr() != theirs[key].data_ptr(), key
    train(model, regime, opt, sched, 6, 7)  # and it trains on from there
    check_groups(model, opt)


def test_optimizer_state_reset_starts_empty():
    model, regime = vit(), DepthTime([2, 4], [0.5], "append", "copy", optimizer_state="reset")
    opt, sched = build(model, regime)
    train(model, regime, opt, sched, 0, 7)  # grows at step 6, then one step
    params = named(model)
    new = [params[k] for k in regime.last_growth.new]
    assert all(float(opt.state[p]["step"]) == 1 for p in new)
    assert float(opt.state[params["blocks.0.attn.qkv.weight"]]["step"]) == 7
    model, regime = vit(), DepthTime([2, 4], [0.5], "append", "copy", optimizer_state="reset")
    opt, sched = build(model, regime)
    train(model, regime, opt, sched, 0, 6)
    regime.before_step(6, model, opt, sched)
    assert all(not opt.state.get(named(model)[k]) for k in regime.last_growth.new)


# ------------------------------------------------------------------------------------------ stackwise learning rates


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_stackwise_factor_0_freezes_the_old_blocks(family):
    model = vit() if family == "vit" else resnet()
    stacks = [2, 4] if family == "vit" else [1, 2]
    regime = DepthTime(stacks, [0.5], "append", "random", "stackwise", old_lr_factor=0.0)
    opt, sched = build(model, regime)
    train(model, regime, opt, sched, 0, 6)
    regime.before_step(6, model, opt, sched)
    for group in opt.param_groups:
        assert (group["lr"] == 0) == (group["stack"] == 0), group["stack"]
    before = {k: v.detach().clone() for k, v in named(model).items()}
    new = set(regime.last_growth.new)
    old = {k for k in regime.last_growth.renamed.values() if k.startswith(("blocks.", "stage"))}
    train(model, regime, opt, sched, 6, TOTAL)
    after = named(model)
    assert old and all(not after[k].requires_grad and torch.equal(after[k], before[k]) for k in old)
    assert all(after[k].requires_grad for k in new)
    assert all(not torch.equal(after[k], before[k]) for k in new)
    assert not torch.equal(after["head.weight"], before["head.weight"])
    check_groups(model, opt)


def test_stackwise_factor_scales_old_stacks_and_compounds():
    model = vit()
    regime = DepthTime([1, 2, 4], [0.25, 0.5], "prepend", "copy", "stackwise", old_lr_factor=0.1)
    opt, sched = build(model, regime)
    rates = {}

    def record(step, info):
        rates[step] = {g.get("stack"): g["lr"] for g in opt.param_groups}

    train(model, regime, opt, sched, 0, TOTAL, record)
    assert set(rates[2]) == {None} and set(rates[3]) == {None, 0, 1} and set(rates[6]) == {None, 0, 1, 2}
    assert rates[4][0] == pytest.approx(0.1 * rates[4][1]) and rates[4][1] == rates[4][None] > 0
    assert rates[7][0] == pytest.approx(0.01 * rates[7][2]) and rates[7][1] == pytest.approx(0.1 * rates[7][2])
    assert [g["stack"] for g in opt.param_groups] == [None, None, 0, 0, 1, 1, 2, 2]
    assert [g["weight_decay"] for g in opt.param_groups] == [WD, 0.0] * 4
    names = {id(p): k for k, p in model.named_parameters()}
    for group in opt.param_groups:  # the decay split is optim.param_groups' own (pos_embed is 3-D, not decayed)
        decayed = {names[id(p)] for p in group["params"] if p.ndim > 1 and names[id(p)] != "pos_embed"}
        assert len(decayed) == (len(group["params"]) if group["weight_decay"] else 0), group["stack"]
    assert any(names[id(p)] == "pos_embed" for p in opt.param_groups[1]["params"])
    assert rates[7][None] == pytest.approx(LR * sched.lr_lambdas[0](7))
    assert len(sched.base_lrs) == len(sched.lr_lambdas) == len(opt.param_groups) == len(sched.get_last_lr())
    check_groups(model, opt)


# --------------------------------------------------------------------------------------------------------- rewarm


def test_lr_rewarm_ramps_every_group_after_a_growth():
    model, regime = vit(), DepthTime([2, 4], [0.5], lr_rewarm_steps=4)
    opt, sched = build(model, regime, scheduler="constant")
    lrs = {}
    train(
        model, regime, opt, sched, 0, TOTAL, lambda step, info: lrs.update({step: [g["lr"] for g in opt.param_groups]})
    )
    assert lrs[5] == [LR, LR]
    for k, step in enumerate(range(6, 10)):
        assert lrs[step] == pytest.approx([LR * (k + 1) / 4] * 2), step
        assert regime.lr_multiplier(step) == (k + 1) / 4
    assert lrs[10] == [LR, LR] and lrs[11] == [LR, LR] and regime.lr_multiplier(10) == 1.0

    model, regime = vit(), DepthTime([1, 2, 4], [0.25, 0.5], scope="stackwise", old_lr_factor=0.5, lr_rewarm_steps=2)
    opt, sched = build(model, regime)  # with warmup + cosine: the ramp multiplies the scheduler's value
    seen = {}

    def record(step, info):
        lam = sched.lr_lambdas[0](step)
        seen[step] = ([g["lr"] for g in opt.param_groups], [base * lam for base in sched.base_lrs])
        assert len(opt.param_groups) == [2, 6, 8][regime.stage]

    train(model, regime, opt, sched, 0, TOTAL, record)
    for step, multiplier in [(2, 1.0), (3, 0.5), (4, 1.0), (5, 1.0), (6, 0.5), (7, 1.0), (8, 1.0)]:
        got, scheduled = seen[step]
        assert got == pytest.approx([lr * multiplier for lr in scheduled]), step


# --------------------------------------------------------------------------------------------------------- resume


RESUMES = [
    ("vit", [1, 2, 4], "append", "copy", "rackwise", 1.0, "adamw", 3),
    ("vit", [1, 2, 4], "prepend", "identity", "stackwise", 0.0, "adamw", 0),
    ("vit", [1, 2, 4], "interleave", "random", "stackwise", 0.1, "sgd", 2),
    ("resnet", [1, 2], "interleave", "identity", "stackwise", 0.5, "sgd", 2),
]


@pytest.mark.parametrize("k", [4, 6, 9])
@pytest.mark.parametrize("family, stacks, mode, init, scope, factor, optimizer, rewarm", RESUMES)
def test_resume_is_bit_identical(family, stacks, mode, init, scope, factor, optimizer, rewarm, k):
    def fresh():
        model = vit() if family == "vit" else resnet()
        regime = DepthTime(stacks, [0.25, 0.5][: len(stacks) - 1], mode, init, scope, factor, "copy", rewarm, seed=3)
        return (model, regime, *build(model, regime, optimizer))

    model, regime, opt, sched = fresh()
    train(model, regime, opt, sched, 0, TOTAL)
    expected = model.state_dict()

    model, regime, opt, sched = fresh()
    train(model, regime, opt, sched, 0, k)  # k=6: saved right before the second growth (stage 1, not 2)
    buffer = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "regime": regime.state_dict(),
        },
        buffer,
    )
    buffer.seek(0)
    state = torch.load(buffer)
    assert state["regime"]["stage"] == (1 if k == 6 or len(stacks) == 2 else 2 if k > 6 else 1)

    model, regime, opt, sched = fresh()
    torch.manual_seed(123)  # the global RNG is not where growth draws from
    regime.load_state_dict(state["regime"])
    regime.replay(state["regime"]["stage"], model, opt, sched)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    train(model, regime, opt, sched, k, TOTAL)
    got = model.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[key], expected[key]) for key in expected), [
        key for key in expected if not torch.equal(got[key], expected[key])
    ]


def test_state_and_description_are_plain_and_checked():
    regime = DepthTime([1, 2, 4], [0.25, 0.5], "interleave", "identity", "stackwise", 0.1, "reset", 5, seed=7)
    regime.plan(TOTAL)
    state = regime.state_dict()
    assert json.loads(json.dumps(state)) == {"stage": 0, "growth_steps": [3, 6], "stacks": [1, 2, 4]}
    assert json.loads(json.dumps(regime.describe())) == {
        "regime": "depth_time",
        "stacks": [1, 2, 4],
        "boundaries": [0.25, 0.5],
        "growth_steps": [3, 6],
        "building_mode": "interleave",
        "init": "identity",
        "scope": "stackwise",
        "old_lr_factor": 0.1,
        "optimizer_state": "reset",
        "lr_rewarm_steps": 5,
        "seed": 7,
    }
    hydra = DepthTime(OmegaConf.create([1, 2, 4]), OmegaConf.create([0.25, 0.5]))  # what Hydra passes
    assert json.dumps(hydra.describe()) and hydra.stacks == [1, 2, 4] and type(hydra.stacks) is list
    other = DepthTime([1, 2, 4], [0.25, 0.5])
    other.load_state_dict(state)
    assert other.growth_steps == [3, 6]
    other.plan(20)
    with pytest.raises(ConfigError, match=r"^trainer.resume=true: the checkpoint grows through stacks \[1, 2, 4\] at"):
        other.load_state_dict(state)


# ------------------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"stacks": [2, 2, 4], "boundaries": [0.3, 0.6]},
            "regime.stacks=[2, 2, 4] must be a non-empty list of positive integers in strictly increasing order; "
            "use e.g. regime.stacks=[1,2,4].",
        ),
        (
            {"stacks": [1, 2, 4], "boundaries": [0.5]},
            "regime.boundaries=[0.5] has 1 entries but regime.stacks=[1, 2, 4] needs 2, one per stage after the first.",
        ),
        (
            {"stacks": [1, 2, 4], "boundaries": [0.5, 1.0]},
            "regime.boundaries=[0.5, 1.0] must be fractions of training strictly between 0 and 1, in strictly "
            "increasing order; use e.g. regime.boundaries=[0.25,0.5].",
        ),
        (
            {"stacks": [1, 2, 4], "boundaries": [0.6, 0.3]},
            "regime.boundaries=[0.6, 0.3] must be fractions of training strictly between 0 and 1, in strictly "
            "increasing order; use e.g. regime.boundaries=[0.25,0.5].",
        ),
        (
            {"stacks": [1, 2], "boundaries": [0.5], "scope": "layerwise"},
            "regime.scope=layerwise is not one of rackwise, stackwise; use e.g. regime.scope=rackwise.",
        ),
        (
            {"stacks": [1, 2], "boundaries": [0.5], "old_lr_factor": 0.1},
            "regime.old_lr_factor=0.1 needs regime.scope=stackwise (rackwise trains every block at the full rate); "
            "set regime.scope=stackwise or regime.old_lr_factor=1.",
        ),
        (
            {"stacks": [1, 2], "boundaries": [0.5], "scope": "stackwise", "old_lr_factor": 1.5},
            "regime.old_lr_factor=1.5 must be a number in [0, 1] (0 freezes the old blocks); "
            "use e.g. regime.old_lr_factor=0.1.",
        ),
        (
            {"stacks": [1, 2], "boundaries": [0.5], "lr_rewarm_steps": -1},
            "regime.lr_rewarm_steps=-1 must be a non-negative integer (0 = no rewarm); "
            "use e.g. regime.lr_rewarm_steps=100.",
        ),
        (
            {"stacks": [1, 2], "boundaries": [0.5], "optimizer_state": "keep"},
            "regime.optimizer_state=keep is not one of copy, reset; use e.g. regime.optimizer_state=copy.",
        ),
        (
            {"stacks": [1, 2], "boundaries": [0.5], "building_mode": "sideways"},
            "regime.building_mode=sideways is not one of append, prepend, interleave; "
            "use e.g. regime.building_mode=append.",
        ),
        (
            {"stacks": [1, 2], "boundaries": [0.5], "seed": "one"},
            "regime.seed=one must be an integer; use e.g. regime.seed=0.",
        ),
        (
            {"stacks": 4, "boundaries": []},
            "regime.stacks=4 must be a list; use e.g. regime.stacks=[1,2,4].",
        ),
    ],
    ids=[
        "stacks_not_increasing",
        "boundary_count",
        "boundary_range",
        "boundaries_not_increasing",
        "scope",
        "factor_with_rackwise",
        "factor_range",
        "negative_rewarm",
        "optimizer_state",
        "mode",
        "seed",
        "stacks_not_list",
    ],
)
def test_refusals(kwargs, message):
    with pytest.raises(ConfigError) as err:
        DepthTime(**kwargs)
    assert str(err.value) == message


def test_refusals_that_need_the_model_or_the_step_count():
    model = vit()
    with pytest.raises(ConfigError) as err:
        DepthTime([1, 2, 3], [0.3, 0.6]).setup(model)
    assert str(err.value) == (
        "regime.stacks=[1, 2, 3] ends at depth 3 but the model has depth 4; make the last entry 4 or set the "
        "model's depth to 3."
    )
    assert depth_of(model) == 4  # untouched
    with pytest.raises(ConfigError) as err:
        DepthTime([1, 2], [0.5]).setup(resnet())
    assert str(err.value) == (
        "regime.init=copy: CifarResNet starting at regime.stacks[0]=1 has only block 0 per stage, which is never "
        "copied; use regime.init=identity or random, or start from depth 2."
    )
    with pytest.raises(ConfigError) as err:
        DepthTime([1, 2, 4], [0.5, 0.52]).plan(10)
    assert str(err.value) == (
        "regime.boundaries=[0.5, 0.52] put the growths at steps [5, 5] of 10 training steps, which must be distinct "
        "and between 1 and 9; use fewer stages, boundaries further apart or more training steps."
    )
