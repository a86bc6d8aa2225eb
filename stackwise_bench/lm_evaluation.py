"""Evaluating a causal language model's run (``model=gpt_micro dataset=shakespeare``): the test pass, seeded samples
and the export to a transformers ``save_pretrained`` folder.

:func:`~stackwise_bench.evaluation.evaluate_checkpoint` comes here for a run whose model is a language model. The
model is rebuilt from the run's recorded config as ``build.build_lm_run`` built it (sized to the tokenizer, LoRA
adapters on the family's targets) at the checkpoint's depth: a depth-time run's ``best.pt`` is at the final depth,
which is the config's ``n_layer``; a checkpoint saved before a growth holds fewer blocks and the model is cut to
them (:func:`~stackwise_bench.nn.growth.match_depth`, which renumbers the KV-cache indices). The test split is
scored with the run's own windows, batch and precision, so ``best.pt`` gives the run's ``test.loss`` again.
With ``zero_shot.task=`` the test pass is a zero-shot task instead (:mod:`stackwise_bench.lm_zero_shot`), read from
its file before any model is built, with the run's batch and precision.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

from stackwise_bench.errors import ConfigError, short_error
from stackwise_bench.knobs.rules import LM_MODEL
from stackwise_bench.runs import jsonsafe
from stackwise_bench.runs.files import atomic_write_text
from stackwise_bench.runs.folders import shown_path

log = logging.getLogger(__name__)

SAMPLES = "samples.jsonl"  # one row per sample, in the eval folder; samples.md shows them for reading
PROVENANCE = "stackwise_bench.json"  # in an export folder: where the weights came from, their test, the tokenizer
NEWLINE_PROMPT = "\n"  # prompt=null: a new line, nanoGPT's sample.py start (a fresh speech in the plays)


class ZeroShot(NamedTuple):
    """A zero-shot task's examples, read before any model is built, and the settings its evaluation records."""

    task: str
    examples: list
    settings: dict


class LMRebuilt(NamedTuple):
    """A language-model run's model with a checkpoint loaded, its test windows, task, data and runtime."""

    model: Any
    loader: Any
    runtime: Any
    classes: list
    epoch: int | None
    data: Any
    task: Any
    name: str


def is_lm_config(config: dict) -> bool:
    """Whether a run's recorded config trained a causal language model."""
    return (config.get("model") or {}).get("_target_") == LM_MODEL


def check_export_target(export) -> Path:
    """The export folder, refused when it exists and is not empty (an export never overwrites anything)."""
    folder = Path(str(export)).expanduser()
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConfigError(
            f"export={export} already exists and is not an empty folder; exports never overwrite: name a new folder."
        )
    return folder


def check_language_options(
    run_dir: Path, config: dict, language: bool, quantize, generate: bool, export, prompt=None, zero_shot_task=None
) -> None:
    """Refuse, before any work, what only one kind of run has: samples, exports and zero-shot tasks (language
    models), quantized weights (image models: stackwise_bench.quant converts nn.Linear/Conv layers, GPT-2's are
    transformers Conv1D)."""
    model = (config.get("model") or {}).get("name")
    if not language and zero_shot_task is not None:
        raise ConfigError(
            f"zero_shot.task={zero_shot_task} scores a language model, and {shown_path(run_dir)} trained model={model} "
            "on images; drop zero_shot.task (or point checkpoint= at a gpt_*/llama_* run)."
        )
    if not language and generate:
        raise ConfigError(
            f"generate=true samples text from a language-model run, and {shown_path(run_dir)} trained model={model} "
            "on images; drop generate=true."
        )
    if not language and export is not None:
        raise ConfigError(
            f"export={export} writes a transformers save_pretrained folder of a language-model run, and "
            f"{shown_path(run_dir)} trained model={model} on images; drop export=."
        )
    if language and quantize is not None:
        raise ConfigError(
            f"quantize={quantize} is not wired for language models (model={model}): post-training quantization here "
            "converts nn.Linear/Conv layers, and GPT-2's projections are transformers Conv1D; drop quantize= (or "
            "export= the weights and quantize that folder with your deployment tool)."
        )
    if language and export is not None:
        check_export_target(export)
    if generate and prompt is not None and not str(prompt):
        raise ConfigError('prompt= is empty and gives the model nothing to continue; use e.g. prompt="ROMEO:".')


def read_zero_shot(zero_shot: dict | None) -> ZeroShot | None:
    """``zero_shot.task``'s examples from ``zero_shot.path`` (and PIQA's ``zero_shot.labels``), refused in one
    sentence before any model is built; None without a task. The settings hold the files' SHA-256, so an evaluation
    of changed files is a new one (``skip_done`` in a study)."""
    from stackwise_bench.lm_zero_shot import KEY, read_task
    from stackwise_bench.runs.provenance import file_sha256

    zero_shot = zero_shot or {}
    task, path, labels = zero_shot.get("task"), zero_shot.get("path"), zero_shot.get("labels")
    if task is None:
        return None
    if path is None:
        raise ConfigError(f"zero_shot.task={task} needs the task's file: add {KEY}=<its released jsonl>.")
    examples = read_task(task, path, labels)
    settings = {"task": task, "path": str(Path(str(path)).expanduser().resolve())}
    settings["sha256"] = file_sha256(Path(settings["path"]))
    if labels is not None:
        settings |= {"labels": str(Path(str(labels)).expanduser().resolve())}
        settings["labels_sha256"] = file_sha256(Path(settings["labels"]))
    return ZeroShot(task, examples, settings)


def rebuild_lm(config: dict, ckpt: Path) -> LMRebuilt:
    """Data, model (+ LoRA) at the checkpoint's depth and the test windows, from a run's resolved ``config``."""
    from omegaconf import OmegaConf

    from stackwise_bench.build import build_runtime, instantiate, with_current_targets
    from stackwise_bench.data.text.dataset import EvalWindows
    from stackwise_bench.nn.growth import match_depth
    from stackwise_bench.nn.lm_models import adapt_lm, check_fits
    from stackwise_bench.nn.state_dict import load_weights, read_checkpoint
    from stackwise_bench.training.lm_task import CausalLM

    cfg = OmegaConf.create(with_current_targets(config))
    runtime = build_runtime(cfg)
    runtime.apply()
    state, epoch = read_checkpoint(ckpt, runtime.device)
    data = instantiate(cfg.dataset)
    model = instantiate(cfg.model, vocab_size=cfg.model.get("vocab_size") or data.vocab_size)
    check_fits(model, cfg.model.name, data.tokenizer.name, data.vocab_size, data.seq_len)
    lora = OmegaConf.to_container(cfg.lora, resolve=True)
    model = adapt_lm(model, lora, cfg.trainer.max_epochs * data.steps_per_epoch, cfg.model.name)
    if not lora["rank"]:  # depth_time grows plain models only (the knobs refuse it with adapters)
        match_depth(model, state)
    model = model.to(runtime.device)
    load_weights(model, state, ckpt, cfg.model.name + (f" with LoRA rank {lora['rank']}" if lora["rank"] else ""))
    batch = runtime.eval_batch_size(cfg.trainer.get("eval_batch_size"), cfg.trainer.batch_size)
    test = EvalWindows(
        data.tokens.splits["test"], data.tokenizer, data.seq_len, batch, runtime.device, data.test_tokens
    )
    task = CausalLM(runtime.autocast, runtime.device)
    return LMRebuilt(model, test, runtime, [], epoch, data, task, cfg.model.name)


def evaluate_lm_into(
    record, built: LMRebuilt, recorded: float | None, generation: dict | None, export, zero_shot: ZeroShot | None = None
) -> None:
    """The test pass or the zero-shot task (and samples, and the export) of a language model into its ``record``."""
    import torch

    from stackwise_bench.nn.growth import depth_of

    if zero_shot is not None:
        test = zero_shot_test(record.dir, built, zero_shot)
    else:
        forward = torch.compile(built.model) if built.runtime.compile else built.model
        test = built.task.evaluate(forward, built.loader, full=True)
        test["matches_recorded"] = None if recorded is None else test["loss"] == recorded
        shown = "" if recorded is None else f" (the run recorded {recorded:.4f})"
        log.info("%s: test %s%s", shown_path(record.dir), built.task.describe(test), shown)
    test["checkpoint_epoch"] = built.epoch
    test["checkpoint_depth"] = depth_of(_base(built.model))
    sections = {"test": test}
    if generation is not None:
        sections["samples"] = write_samples(record.dir, built, **generation)
    if export is not None:
        sections["export"] = export_pretrained(built, export, record, test)
    record.finish("completed", **sections)


def zero_shot_test(folder: Path, built: LMRebuilt, zero_shot: ZeroShot) -> dict:
    """The test section of a zero-shot task: ``<task>_acc`` (percent), LAMBADA's ``lambada_ppl``, the multiple-choice
    tasks' ``<task>_acc_norm``; the run's eval batch (its windows' batch) and precision (its autocast)."""
    from stackwise_bench.lm_zero_shot import score

    t0 = time.perf_counter()
    with built.runtime.autocast():
        metrics = score(built.model, built.data.tokenizer, zero_shot.task, zero_shot.examples, built.loader.batch_size)
    elapsed = time.perf_counter() - t0
    n = metrics.pop("n")
    test = {f"{zero_shot.task}_{k}": v for k, v in metrics.items()}
    shown = "  ".join(f"{k} {v:.4g}" for k, v in test.items())
    log.info("%s: %s over %d examples", shown_path(folder), shown, n)
    return {**test, "examples": n, "infer_example_s": n / max(elapsed, 1e-9)}


def write_samples(
    folder: Path, built: LMRebuilt, prompt, max_new_tokens: int, temperature: float, top_k, seed: int, samples: int
) -> dict:
    """``samples`` completions of ``prompt`` into ``samples.jsonl`` and ``samples.md``; sample i is drawn from a
    generator seeded with ``seed + i``, so any one of them can be drawn again alone. Returns the summary's section."""
    import torch

    from stackwise_bench.nn.generate import generate_ids

    tokenizer, model = built.data.tokenizer, built.model
    text = NEWLINE_PROMPT if prompt is None else str(prompt)
    ids = tokenizer.encode(text)
    eos = getattr(_base(model).config, "eos_token_id", None)
    rows, t0 = [], time.perf_counter()
    for i in range(samples):
        generator = torch.Generator(device=built.runtime.device).manual_seed(seed + i)
        with built.runtime.autocast():
            out = generate_ids(
                model, ids, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator,
                vocab_size=tokenizer.vocab_size, eos_token_id=eos if isinstance(eos, int) else None,
            )  # fmt: skip
        rows.append(
            {"index": i, "seed": seed + i, "prompt": text, "completion": tokenizer.decode(out.ids),
             "new_tokens": len(out.ids), "stopped": out.stopped, "ids": out.ids}
        )  # fmt: skip
    elapsed = time.perf_counter() - t0
    atomic_write_text(folder / SAMPLES, "".join(jsonsafe.dumps(r) + "\n" for r in rows))
    atomic_write_text(folder / "samples.md", _samples_markdown(rows, built.name, temperature, top_k))
    tokens = sum(r["new_tokens"] for r in rows)
    log.info("%s: %d sample(s), %d new tokens", shown_path(folder / SAMPLES), len(rows), tokens)
    return {
        "file": SAMPLES,
        "count": len(rows),
        "prompt": text,
        "prompt_tokens": len(ids),
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "decoding": "greedy" if temperature == 0 else "sampling",
        "top_k": top_k,
        "seed": seed,
        "tokenizer": tokenizer.describe(),
        "new_tokens": tokens,
        "token_s": tokens / max(elapsed, 1e-9),
    }


def _samples_markdown(rows: list[dict], name: str, temperature: float, top_k) -> str:
    how = "greedy" if temperature == 0 else f"temperature {temperature}, top_k {top_k}"
    parts = [f"# Samples of {name} ({how})\n"]
    for r in rows:
        parts.append(f"\n## Sample {r['index']} (seed {r['seed']}, {r['new_tokens']} tokens, {r['stopped']})\n\n")
        parts.append("````text\n" + r["prompt"] + r["completion"] + "\n````\n")
    return "".join(parts)


def export_pretrained(built: LMRebuilt, export, record, test: dict) -> dict:
    """The tested weights (LoRA adapters merged into them) as a ``save_pretrained`` folder that
    ``model.checkpoint_path=`` loads; written beside it first and renamed into place, so a folder there is whole."""
    folder = check_export_target(export)
    model = _merged(built.model)
    partial = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        model.save_pretrained(partial, safe_serialization=True)
        source = record.summary.get("source", {})
        provenance = {
            "source_run": source.get("dir"),
            "checkpoint": source.get("checkpoint"),
            "checkpoint_sha256": source.get("checkpoint_sha256"),
            "evaluation": str(record.dir.resolve()),
            "model": built.name,
            "tokenizer": built.data.tokenizer.describe(),
            "seq_len": built.data.seq_len,
            "test": {k: test.get(k) for k in ("loss", "ppl", "bpb", "word_ppl") if k in test},
        }
        atomic_write_text(partial / PROVENANCE, json.dumps(provenance, indent=2) + "\n")
        os.rename(partial, folder)  # onto a missing or empty folder only
    except OSError as exc:
        _remove(partial)
        raise ConfigError(
            f"export={export} could not be written ({short_error(exc)}); name a new folder where you can write."
        ) from exc
    except BaseException:
        _remove(partial)
        raise
    files = sorted(p.name for p in folder.iterdir())
    log.info("exported the tested weights to %s (load them with model.checkpoint_path=%s)", folder, folder)
    return {"dir": str(folder.resolve()), "files": files, "merged_adapters": model is not _base(built.model)}


def _merged(model):
    """The model to save: a peft model's adapters merged into a copy of its base weights; a plain model itself."""
    if not hasattr(model, "merge_and_unload"):
        return model
    import copy

    try:
        return copy.deepcopy(model).merge_and_unload()
    except (ValueError, TypeError, NotImplementedError, AttributeError) as exc:
        raise ConfigError(
            f"export: this run's adapters cannot be merged into the base weights ({short_error(exc)}); export a "
            "run trained with lora.method=lora (or another mergeable method)."
        ) from exc


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
