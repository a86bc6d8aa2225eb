"""python -m stackwise_bench.evaluate on causal language-model runs: the test loss again from best.pt (also after
depth growth), seeded samples, greedy decoding equal with and without the KV cache (also after a growth), and the
export to a save_pretrained folder that a new run starts from."""

from __future__ import annotations

import json
import re

import pytest
import torch

from stackwise_bench.errors import ConfigError
from stackwise_bench.evaluation import evaluate_checkpoint

from conftest import compose, read_summary


def tiny(cache, *extra: str) -> list[str]:
    """gpt_micro on the plays' bytes: windows of 16 tokens, 4 per batch, 4 steps per epoch."""
    return [
        "model=gpt_micro",
        "dataset=shakespeare",
        "trainer.max_epochs=1",
        "dataset.steps_per_epoch=4",
        "trainer.batch_size=4",
        "dataset.seq_len=16",
        "dataset.val_tokens=512",
        "dataset.test_tokens=1024",
        f"dataset.cache_dir={cache}",
        "trainer.threads=1",
        "monitors=none",
        *extra,
    ]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tokens")


def _train(tmp_path_factory, cache, name: str, *extra: str):
    from stackwise_bench.train import run

    run_dir = tmp_path_factory.mktemp("lm_eval") / name
    summary = run(compose(tiny(cache, *extra)), run_dir)
    assert summary["status"] == "completed", summary.get("error")
    return run_dir, summary


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, cache):
    return _train(tmp_path_factory, cache, "baseline")


@pytest.fixture(scope="module")
def grown_run(tmp_path_factory, cache):
    """regime=depth_time: stacks [1, 2, 4], one epoch each, grown by interleaved copies; best.pt at the final depth."""
    extra = ("regime=depth_time", "regime.building_mode=interleave", "regime.init=copy", "trainer.max_epochs=3")
    return _train(tmp_path_factory, cache, "depth_time", *extra)


def test_best_pt_gives_the_runs_test_loss_again(lm_run):
    run_dir, summary = lm_run
    s = evaluate_checkpoint(run_dir)
    test, recorded = s["test"], summary["test"]
    assert s["status"] == "completed" and s["run"]["dir"] == str((run_dir / "eval" / "best").resolve())
    assert test["loss"] == recorded["loss"] and test["matches_recorded"] is True  # bit for bit: same windows, batch
    assert test["ppl"] == recorded["ppl"] and test["bpb"] == recorded["bpb"] and test["tokens"] == 1023
    assert s["source"]["recorded_test_loss"] == recorded["loss"] and test["checkpoint_depth"] == 4
    assert read_summary(run_dir / "eval" / "best") == s and "samples" not in s and "export" not in s


@pytest.mark.slow
def test_a_grown_runs_best_pt_is_rebuilt_at_its_depth(grown_run):
    run_dir, summary = grown_run
    assert summary["test"]["checkpoint_depth"] == 4 and summary["train"]["growth_steps"] == [4, 8]
    s = evaluate_checkpoint(run_dir)
    assert s["test"]["loss"] == summary["test"]["loss"] and s["test"]["checkpoint_depth"] == 4


def _rows(folder):
    return [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]


def test_seeded_samples_are_repeated_exactly(lm_run):
    run_dir, _ = lm_run
    gen = {"generate": True, "prompt": "ROMEO:", "max_new_tokens": 24, "samples": 2, "temperature": 1.0}
    first = evaluate_checkpoint(run_dir, name="sampled", **gen)
    again = evaluate_checkpoint(run_dir, name="sampled", **gen)  # a second folder: sampled_2
    other = evaluate_checkpoint(run_dir, name="sampled", **{**gen, "seed": 7})
    a, b, c = (_rows(run_dir / "eval" / n) for n in ("sampled", "sampled_2", "sampled_3"))
    assert again["run"]["dir"].endswith("sampled_2") and [r["seed"] for r in a] == [1337, 1338]
    assert a == b and [r["completion"] for r in a] != [r["completion"] for r in c]
    assert all(r["new_tokens"] == 24 and r["prompt"] == "ROMEO:" and len(r["ids"]) == 24 for r in a)
    assert first["samples"]["count"] == 2 and first["samples"]["decoding"] == "sampling"
    assert other["test"]["loss"] == first["test"]["loss"]  # sampling never touches the test pass
    md = (run_dir / "eval" / "sampled" / "samples.md").read_text()
    assert "## Sample 1 (seed 1338, 24 tokens, length)" in md and "ROMEO:" + a[0]["completion"] in md


def _grown(name: str, mode: str, init: str):
    """``name`` with random weights large enough that greedy choices are far from ties, grown from 2 to 5 blocks."""
    from stackwise_bench.nn.causal_lm import build_named
    from stackwise_bench.nn.growth import grow

    torch.manual_seed(0)
    model = build_named(name, vocab_size=256, n_layer=2, init_std=0.2)
    grow(model, 5, mode, init, torch.Generator().manual_seed(1))
    return model


@pytest.mark.parametrize("name", ["gpt_micro", "llama_micro"])
@pytest.mark.parametrize("mode,init", [("append", "copy"), ("interleave", "random"), ("prepend", "identity")])
def test_greedy_is_the_same_with_and_without_the_kv_cache_after_growth(name, mode, init):
    from stackwise_bench.nn.generate import generate_ids

    model = _grown(name, mode, init)
    indices = [m.layer_idx for m in model.modules() if hasattr(m, "layer_idx")]
    assert indices == list(range(5)) and model.config.num_hidden_layers == 5
    prompt = list(b"ROMEO: ")
    for steps in (20, 70):  # within the 64-token context, and past it (the window slides)
        cached = generate_ids(model, prompt, steps, use_cache=True)
        uncached = generate_ids(model, prompt, steps, use_cache=False)
        assert cached.ids == uncached.ids and len(cached.ids) == steps
        assert len(set(cached.ids)) > 1  # not a degenerate repeat of one token
    attention = [m for m in model.modules() if hasattr(m, "layer_idx")]
    attention[-1].layer_idx = attention[-2].layer_idx  # the trap growth renumbers away: two layers, one cache slot
    assert generate_ids(model, prompt, 20, use_cache=True).ids != generate_ids(model, prompt, 20, use_cache=False).ids


def test_sampling_is_seeded_by_its_generator():
    from stackwise_bench.nn.causal_lm import build_named
    from stackwise_bench.nn.generate import generate_ids

    torch.manual_seed(0)
    model = build_named("gpt_micro", vocab_size=256)

    def draw(seed, use_cache=True):
        g = torch.Generator().manual_seed(seed)
        return generate_ids(model, [10], 30, temperature=1.0, top_k=50, generator=g, use_cache=use_cache).ids

    assert draw(3) == draw(3) == draw(3, use_cache=False) and draw(3) != draw(4)
    assert all(i < 200 for i in generate_ids(model, [10], 30, temperature=1.0, vocab_size=200).ids)


def test_export_starts_a_new_run_from_the_tested_weights(lm_run, tmp_path, cache):
    from stackwise_bench.build import build_run
    from stackwise_bench.nn.state_dict import read_checkpoint

    run_dir, summary = lm_run
    folder = tmp_path / "exports" / "gpt_micro"
    s = evaluate_checkpoint(run_dir, export=str(folder), name="exported")
    assert {"config.json", "model.safetensors", "stackwise_bench.json"} <= set(s["export"]["files"])
    provenance = json.loads((folder / "stackwise_bench.json").read_text())
    assert provenance["test"]["loss"] == summary["test"]["loss"] and provenance["tokenizer"]["name"] == "byte"
    built = build_run(compose(tiny(cache, f"model.checkpoint_path={folder}")), resume=False)
    best, _ = read_checkpoint(run_dir / "checkpoints" / "best.pt", "cpu")
    own = built.model.state_dict()
    assert own.keys() == best.keys() and all(torch.equal(own[k].cpu(), best[k]) for k in best)
    assert built.task.evaluate(built.model, built.loaders.test, full=True)["loss"] == summary["test"]["loss"]
    with pytest.raises(ConfigError, match=r"^export=.* already exists and is not an empty folder; exports never"):
        evaluate_checkpoint(run_dir, export=str(folder), name="again")
    assert not (run_dir / "eval" / "again").exists()  # refused before any work


@pytest.mark.slow
def test_export_merges_lora_adapters(tmp_path_factory, cache, tmp_path):
    from stackwise_bench.nn.causal_lm import load_causal_lm

    run_dir, summary = _train(tmp_path_factory, cache, "lora", "lora.rank=4")
    folder = tmp_path / "merged"
    s = evaluate_checkpoint(run_dir, export=str(folder))
    assert s["export"]["merged_adapters"] is True and s["test"]["loss"] == summary["test"]["loss"]
    model = load_causal_lm(folder)
    assert not any("lora" in k for k in model.state_dict())
    from stackwise_bench.build import build_run

    built = build_run(compose(tiny(cache, f"model.checkpoint_path={folder}")), resume=False)
    merged = built.task.evaluate(built.model, built.loaders.test, full=True)["loss"]
    assert merged == pytest.approx(summary["test"]["loss"], rel=1e-5)


def test_language_model_refusals(lm_run, tmp_path):
    run_dir, _ = lm_run
    before = sorted(p.name for p in (run_dir / "eval").iterdir()) if (run_dir / "eval").exists() else []
    with pytest.raises(ConfigError, match=r"^quantize=int8 is not wired for language models \(model=gpt_micro\)"):
        evaluate_checkpoint(run_dir, quantize="int8")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ConfigError, match=r"already exists and is not an empty folder"):
        evaluate_checkpoint(run_dir, export=str(tmp_path / "full"))
    with pytest.raises(ConfigError, match=r"^prompt= is empty and gives the model nothing to continue"):
        evaluate_checkpoint(run_dir, generate=True, prompt="", name="empty")
    assert sorted(p.name for p in (run_dir / "eval").iterdir()) == before  # each refused before any work


@pytest.mark.slow
def test_image_runs_refuse_generate_and_export(tmp_path):
    from stackwise_bench.train import run

    overrides = ["trainer.max_epochs=1", "monitors=none"]
    run_dir = tmp_path / "image"
    assert run(compose(overrides), run_dir, overrides=overrides)["status"] == "completed"
    with pytest.raises(ConfigError, match=r"^generate=true samples text from a language-model run, and .* on images"):
        evaluate_checkpoint(run_dir, generate=True)
    with pytest.raises(ConfigError, match=r"^export=.* writes a transformers save_pretrained folder of a language-m"):
        evaluate_checkpoint(run_dir, export=str(tmp_path / "x"))
    assert not (run_dir / "eval").exists() and not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "argv,says",
    [
        (["generate=true", "prompt="], r"^prompt='' must be non-empty text, or null \(null = a new line\); use e\.g\."),
        (["generate=true", "temperature=-1"], r"^temperature=-1 must be a non-negative number \(0 = greedy\)"),
        (["generate=true", "top_k=0"], r"^top_k=0 must be a positive integer, or null \(null = every token\)"),
        (["generate=true", "samples=0"], r"^samples=0 must be an integer in \[1, 1000\]"),
        (["generate=true", "max_new_tokens=0"], r"^max_new_tokens=0 must be a positive integer"),
        (["generate=true", "seed=-1"], r"^seed=-1 must be a non-negative integer below 2\*\*64"),
        (["generate=maybe"], r"^generate=maybe must be true or false"),
        (["export=[a]"], r"^export=\[a\] must be a folder path, or null"),
        (["generate=true", "temperature=0", "samples=3"], r"^samples=3 with temperature=0: greedy decoding gives one"),
        (["prompt=ROMEO:"], r"^prompt=ROMEO: only applies to generate=true; add generate=true, or drop prompt\.$"),
        (["samples=2"], r"^samples=2 only applies to generate=true"),
    ],
)
def test_bad_generation_arguments(argv, says):
    from stackwise_bench.evaluate import parse_args

    with pytest.raises(ConfigError) as info:
        parse_args(["checkpoint=multirun/x", *argv])
    message = str(info.value)
    assert "\n" not in message and message.endswith(".") and re.search(says, message), message


def test_prompt_is_taken_verbatim():
    from stackwise_bench.evaluate import parse_args

    for text in ("ROMEO:", "ROMEO: hi", "1999", "a=b", "[x]", "#1"):
        args = parse_args(["checkpoint=multirun/x", "generate=true", f"prompt={text}"])
        assert args["prompt"] == text


def test_command_line(lm_run, tmp_path, capsys):
    """The entrypoint in-process: exit 0 with the eval folder on stdout; exit 2 and one sentence for bad input."""
    from stackwise_bench.evaluate import main

    run_dir, _ = lm_run
    argv = [f"checkpoint={run_dir}", "generate=true", "prompt=ROMEO:", "temperature=0", "max_new_tokens=8"]
    assert main([*argv, "name=cli", f"export={tmp_path / 'out'}"]) == 0
    assert capsys.readouterr().out.strip().endswith("cli")
    (row,) = _rows(run_dir / "eval" / "cli")
    assert row["prompt"] == "ROMEO:" and row["new_tokens"] == 8 and (tmp_path / "out" / "config.json").is_file()
    assert main([*argv, f"export={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: export=") and "\n" not in err


def test_generation_defaults_agree_with_conf():
    """conf/evaluate.yaml's sampling defaults = the knobs' 'not given' values = evaluate_checkpoint's defaults."""
    import inspect

    from omegaconf import OmegaConf

    from stackwise_bench.evaluate import CONF
    from stackwise_bench.knobs import GENERATION_DEFAULTS

    conf = OmegaConf.to_container(OmegaConf.load(CONF))
    signature = inspect.signature(evaluate_checkpoint).parameters
    for key in (*GENERATION_DEFAULTS, "samples", "generate", "export"):
        assert signature[key].default == conf[key] == GENERATION_DEFAULTS.get(key, conf[key]), key
