"""Depth growth (stackwise_bench.nn.growth): layouts, inits, name maps, reproducibility, training, refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stackwise_bench.errors import ConfigError
from stackwise_bench.nn.growth import INITS, MODES, block_lists, depth_of, grow, growth_sources, truncate
from stackwise_bench.nn.models import create_model

D, H = 64, 128  # vit_micro_p4's width and MLP hidden size (conf/model/vit_micro_p4.yaml)
WIDTHS = (16, 32, 64)  # CifarResNet's stage widths


def vit(seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("vit_micro_p4", 10, img_size=8, **kwargs)


def resnet(name: str = "resnet14", seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model(name, 10, **kwargs)
    for m in model.modules():  # non-trivial BN statistics and affine terms, so copies and identities are tested
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model


def inputs(model: nn.Module) -> torch.Tensor:
    size = 8 if hasattr(model, "blocks") else 32  # vit_micro_p4 reads 8 px, the CIFAR ResNets 32 px
    return torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def as_string(layout) -> str:
    return " ".join("ABCDEFG"[i] + ("'" if new else "") for i, new in layout)


@pytest.mark.parametrize(
    "k, n, mode, expected",
    [
        (2, 4, "append", "A B A' B'"),
        (3, 5, "append", "A B C B' C'"),
        (2, 6, "append", "A B A' B' A' B'"),
        (3, 7, "append", "A B C C' A' B' C'"),
        (2, 4, "prepend", "A' B' A B"),
        (3, 5, "prepend", "A' B' A B C"),
        (2, 6, "prepend", "A' B' A' B' A B"),
        (2, 4, "interleave", "A A' B B'"),
        (3, 5, "interleave", "A A' B C C'"),
        (2, 3, "interleave", "A B B'"),
        (4, 5, "interleave", "A B C C' D"),
        (2, 6, "interleave", "A A' A' B B' B'"),
        (3, 3, "interleave", "A B C"),
    ],
)
def test_growth_sources_documented_layouts(k, n, mode, expected):
    assert as_string(growth_sources(k, n, mode)) == expected


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k, n", [(1, 4), (2, 3), (3, 8), (5, 7), (4, 13)])
def test_growth_sources_keep_old_order_and_count(k, n, mode):
    layout = growth_sources(k, n, mode)
    assert len(layout) == n
    assert [i for i, new in layout if not new] == list(range(k))
    assert all(0 <= i < k for i, _ in layout)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "build, depth",
    [(lambda: vit(), 4), (lambda: vit(), 5), (lambda: resnet("resnet8"), 3), (lambda: resnet("resnet14"), 5)],
    ids=["vit2to4", "vit2to5", "resnet8_1to3", "resnet14_2to5"],
)
def test_identity_growth_keeps_the_function(build, depth, mode):
    model = build().eval()
    x = inputs(model)
    with torch.no_grad():
        before = model(x)
        grow(model, depth, mode, "identity", torch.Generator().manual_seed(0))
        after = model(x)
    assert depth_of(model) == depth
    torch.testing.assert_close(after, before)


def test_identity_keeps_the_function_with_layer_scale_and_drop_path():
    model = vit(init_values=0.1, drop_path_rate=0.2).eval()
    x = inputs(model)
    with torch.no_grad():
        before = model(x)
        grow(model, 6, "interleave", "identity")
        torch.testing.assert_close(model(x), before)
    new = model.blocks[1]
    assert torch.equal(new.ls1.gamma, torch.full((D,), 0.1))  # the layer scale keeps its init value
    assert not new.attn.proj.weight.any() and not new.mlp.fc2.bias.any()
    assert new.attn.qkv.weight.abs().sum() > 0


def _check_layout(old: list[nn.Module], grown: nn.Sequential, layout, fixed: int) -> None:
    """Old blocks by identity, copies by weights and buffers equal to their source's (and not shared)."""
    assert len(grown) == fixed + len(layout)
    for b_old, b_new in zip(old[:fixed], list(grown)[:fixed]):
        assert b_new is b_old
    for (src, is_new), block in zip(layout, list(grown)[fixed:]):
        source = old[fixed + src]
        if not is_new:
            assert block is source
            continue
        assert all(b is not block for b in old)
        ours, theirs = block.state_dict(), source.state_dict()
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), key
            assert ours[key].data_ptr() != theirs[key].data_ptr(), key


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k, n", [(2, 4), (3, 5), (2, 6)])
def test_vit_copy_layout(k, n, mode):
    model = vit(depth=k)
    old = list(model.blocks)
    grow(model, n, mode, "copy")
    _check_layout(old, model.blocks, growth_sources(k, n, mode), fixed=0)
    assert [e["module"] for e in model.feature_info] == [f"blocks.{i}" for i in range(n)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k, n", [(2, 4), (3, 5), (2, 6)])
def test_resnet_copy_layout_after_block_0(k, n, mode):
    model = resnet("resnet14")  # 2 blocks per stage; 3 through a first growth
    grow(model, k, "append", "random")
    old = [list(stage) for stage in block_lists(model)]
    grow(model, n, mode, "copy")
    for stage_old, stage in zip(old, block_lists(model)):
        _check_layout(stage_old, stage, growth_sources(k - 1, n - 1, mode), fixed=1)


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("mode", MODES)
def test_parameter_counts_follow_the_formula(mode, init):
    model = vit()
    count = n_params(model)
    grow(model, 5, mode, init)
    per_block = 2 * 2 * D + (D * 3 * D + 3 * D) + (D * D + D) + (D * H + H) + (H * D + D)  # norms, qkv, proj, mlp
    assert n_params(model) == count + 3 * per_block

    model = resnet("resnet14")
    count = n_params(model)
    grow(model, 4, mode, init)
    per_stage = [18 * c * c + 4 * c for c in WIDTHS]  # two 3x3 convs (no bias) and two BNs per stride-1 block
    assert n_params(model) == count + 2 * sum(per_stage)
    for stage, c in zip(block_lists(model), WIDTHS):
        assert n_params(stage) == n_params(stage[0]) + 3 * (18 * c * c + 4 * c)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_name_maps(family, init, mode):
    model = vit(depth=3) if family == "vit" else resnet("resnet14")
    before = dict(model.named_parameters())
    result = grow(model, 5, mode, init)
    after = dict(model.named_parameters())
    assert result.renamed.keys() == before.keys()
    for old_name, new_name in result.renamed.items():
        assert after[new_name] is before[old_name]
    assert sorted(result.new) == sorted(set(after) - set(result.renamed.values()))
    assert result.new == [k for k in after if k in set(result.new)]  # in model order
    if init != "copy":
        assert result.copied == {}
        return
    assert result.copied.keys() == set(result.new)
    for new_name, source in result.copied.items():
        assert source in result.renamed.values()
        assert new_name.split(".", 2)[-1] == source.split(".", 2)[-1]  # the same parameter of another block
        assert torch.equal(after[new_name], after[source]) and after[new_name] is not after[source]
    if mode == "prepend" and family == "vit":
        assert result.renamed["blocks.0.attn.qkv.weight"] == "blocks.2.attn.qkv.weight"
        assert result.copied["blocks.0.mlp.fc1.bias"] == "blocks.2.mlp.fc1.bias"


@pytest.mark.parametrize("init", ["identity", "random"])
@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_generator_makes_fresh_weights_reproducible(family, init):
    def grown(seed: int) -> dict:
        model = vit() if family == "vit" else resnet("resnet14")
        grow(model, 4, "interleave", init, torch.Generator().manual_seed(seed))
        return model.state_dict()

    rng = torch.get_rng_state()
    a, b, c = grown(3), grown(3), grown(4)
    torch.set_rng_state(rng)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    differ = [k for k in a if not torch.equal(a[k], c[k])]
    key = "blocks.1.attn.qkv.weight" if family == "vit" else "stage2.2.conv1.weight"
    assert key in differ
    old = "blocks.0.attn.qkv.weight" if family == "vit" else "stage2.1.conv1.weight"
    assert old not in differ  # old blocks are untouched


def test_generator_leaves_the_global_rng_alone():
    model = vit()
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    grow(model, 4, "append", "random", torch.Generator().manual_seed(0))
    assert torch.equal(torch.rand(3), expected)


def test_random_init_follows_the_family_scheme():
    model = vit()  # weight_init=jax: xavier-uniform Linears, zero biases except the MLP's (std 1e-6), LayerNorm 1/0
    grow(model, 3, "append", "random", torch.Generator().manual_seed(0))
    new, old = model.blocks[2], model.blocks[1]
    bound = (6 / (D + 3 * D)) ** 0.5
    assert 0.9 * bound < new.attn.qkv.weight.abs().max() <= bound
    assert not torch.equal(new.attn.qkv.weight, old.attn.qkv.weight)
    assert not new.attn.qkv.bias.any() and 0 < new.mlp.fc1.bias.abs().max() < 1e-4
    assert torch.equal(new.norm1.weight, torch.ones(D)) and not new.norm1.bias.any()

    model = resnet("resnet14")
    grow(model, 3, "prepend", "random", torch.Generator().manual_seed(0))
    new = model.stage3[1]
    assert torch.equal(new.bn2.weight, torch.ones(64)) and not new.bn2.bias.any()
    assert not new.bn1.running_mean.any() and torch.equal(new.bn1.running_var, torch.ones(64))
    std = (2 / (64 * 9)) ** 0.5  # kaiming normal, fan_out
    assert 0.9 * std < new.conv1.weight.std() < 1.1 * std
    assert not torch.equal(new.conv1.weight, model.stage3[2].conv1.weight)


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_grown_model_trains_and_new_blocks_get_gradients(family, init):
    model = vit() if family == "vit" else resnet("resnet14")
    model.train()
    if family == "vit":  # weight_init=jax zeroes the head, which would hold every other gradient at 0 on step 1
        nn.init.normal_(model.head.weight, std=0.1)
    x = inputs(model)
    model(x).sum().backward()  # stale gradients on the old blocks must not leak into the copies
    result = grow(model, 4, "interleave", init, torch.Generator().manual_seed(0))
    params = dict(model.named_parameters())
    assert all(params[k].grad is None for k in result.new)
    model.zero_grad(set_to_none=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    y = torch.arange(len(x)) % 10
    nn.functional.cross_entropy(model(x), y).backward()
    last = ("attn.proj.weight", "mlp.fc2.weight") if family == "vit" else ("bn2.weight",)
    for name in result.new:
        assert params[name].grad is not None, name
        if name.endswith(last):
            assert params[name].grad.abs().sum() > 0, name
    snapshot = {k: params[k].detach().clone() for k in result.new}
    optimizer.step()
    assert any(not torch.equal(snapshot[k], params[k]) for k in result.new if k.endswith(last))


def test_drop_path_rates_are_the_sources():
    model = vit(drop_path_rate=0.2)  # rates 0.0 and 0.2
    grow(model, 4, "interleave", "copy")
    assert [getattr(b.drop_path1, "drop_prob", 0.0) for b in model.blocks] == pytest.approx([0.0, 0.0, 0.2, 0.2])

    model = resnet("resnet14", drop_path_rate=0.3)
    rates = [b.drop_path for b in model.stage2]
    grow(model, 4, "append", "identity")
    assert [b.drop_path for b in model.stage2] == [rates[0], rates[1], rates[1], rates[1]]
    model = resnet("resnet8", drop_path_rate=0.3)
    grow(model, 3, "prepend", "random")
    assert [b.drop_path for b in model.stage3] == [model.stage3[0].drop_path] * 3


def test_new_blocks_match_dtype_train_mode_and_drop_hooks():
    model = vit().double().eval()
    calls = []
    model.blocks[0].register_forward_hook(lambda *_: calls.append(1))
    for init in INITS:
        grow(model, depth_of(model) + 1, "prepend", init)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert not any(b.training for b in model.blocks)
    model(inputs(model).double())
    assert len(calls) == 1  # the hook stays on its block and is not copied
    model = resnet("resnet8").half()
    grow(model, 2, "append", "identity")
    assert model.stage1[1].conv1.weight.dtype == torch.float16 and model.stage1[1].training


def test_truncate_keeps_the_starting_stack():
    model = vit(depth=4)
    first = list(model.blocks)[:2]
    truncate(model, 2)
    assert list(model.blocks) == first and depth_of(model) == 2
    assert len(model.feature_info) == 2
    model = resnet("resnet14")
    first = [stage[0] for stage in block_lists(model)]
    truncate(model, 1)
    assert [list(stage) for stage in block_lists(model)] == [[b] for b in first]
    grow(model, 3, "interleave", "identity")
    assert depth_of(model) == 3 and model(inputs(model)).shape == (4, 10)


def test_no_op_growth():
    model = vit()
    result = grow(model, 2, "append", "copy")
    assert result.new == [] and result.copied == {} and all(k == v for k, v in result.renamed.items())


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda m: grow(m, 4, "sideways", "copy"),
            "regime.building_mode=sideways is not one of append, prepend, interleave; use e.g. "
            "regime.building_mode=append.",
        ),
        (
            lambda m: grow(m, 4, "append", "zeros"),
            "regime.init=zeros is not one of copy, identity, random; use e.g. regime.init=copy.",
        ),
        (
            lambda m: grow(m, 1, "append", "copy"),
            "regime.stacks: cannot grow VisionTransformer to depth 1, it already has 2; "
            "list depths in increasing order.",
        ),
        (
            lambda m: grow(m, 2.5, "append", "copy"),
            "regime.stacks: depth 2.5 is not a positive integer; use e.g. regime.stacks=[2,4].",
        ),
        (
            lambda m: truncate(m, 3),
            "regime.stacks: cannot start VisionTransformer at depth 3, it has only 2; start at most at 2 "
            "(raise the model's depth instead).",
        ),
        (
            lambda m: truncate(m, 0),
            "regime.stacks: depth 0 is not a positive integer; use e.g. regime.stacks=[2,4].",
        ),
        (
            lambda m: grow(nn.Sequential(m), 4, "append", "copy"),
            "model: depth growth supports timm VisionTransformer/DeiT models and CifarResNet, not Sequential; "
            "use e.g. model=vit_micro_p4 or model=resnet14 (the raw model, before any wrapper).",
        ),
    ],
    ids=["mode", "init", "smaller", "not_int", "truncate_deeper", "truncate_zero", "unsupported"],
)
def test_refusals(call, message):
    model = vit()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError) as err:
        call(model)
    assert str(err.value) == message
    assert depth_of(model) == 2 and model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_copy_refused_without_a_stride_1_block():
    model = resnet("resnet8")
    with pytest.raises(ConfigError) as err:
        grow(model, 2, "append", "copy")
    assert str(err.value) == (
        "regime.init=copy: CifarResNet has only block 0 per stage, which is never copied; "
        "use regime.init=identity or random, or start from depth 2."
    )
    assert depth_of(model) == 1
    for bad in (block_lists, depth_of):
        with pytest.raises(ConfigError, match="^model: depth growth supports .* not Linear;"):
            bad(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="^regime.stacks: cannot grow 0 blocks to 2;"):
        growth_sources(0, 2, "append")


@pytest.mark.gpu
@pytest.mark.parametrize("init", INITS)
def test_growth_on_cuda_lands_on_the_device(init):
    model = vit().cuda().eval()
    x = inputs(model).cuda()
    with torch.no_grad():
        before = model(x)
    cpu = vit()
    generator = torch.Generator("cuda").manual_seed(0)
    grow(model, 4, "interleave", init, generator)
    grow(cpu, 4, "interleave", init, torch.Generator("cuda").manual_seed(0))
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    for key, value in model.state_dict().items():  # fresh weights are drawn on the CPU: the same on any device
        assert torch.equal(value.cpu(), cpu.state_dict()[key]), key
    if init == "identity":
        with torch.no_grad():
            torch.testing.assert_close(model(x), before)
