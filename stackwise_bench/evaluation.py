"""Evaluating trained runs: one checkpoint (:func:`evaluate_checkpoint`), or every finished run of a study.

Rebuilds a run's data and model from the run's own config exactly as training
built them (:func:`stackwise_bench.build.rebuild`; the checkpoint loads with
``weights_only=True``), evaluates the test split, and writes
``<run>/eval/<name>/summary.json`` (atomically, never over an existing folder).
With ``quantize=fp8_e4m3|fp8_e5m2|int8|int4`` the weights are also quantized after the
baseline pass (:mod:`stackwise_bench.quant.ptq`, :mod:`stackwise_bench.quant.intq`), and the summary holds both
passes, the degradation in points and the weight bytes. The command line and the
evaluation-study Hydra app are :mod:`stackwise_bench.evaluate`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from stackwise_bench.build import rebuild
from stackwise_bench.errors import ConfigError
from stackwise_bench.knobs.rules import (
    BERT_MODEL,
    GROUP_SIZE_DEFAULT,
    group_size_problem,
    int_activations_problem,
)
from stackwise_bench.lm_evaluation import (
    check_language_options,
    evaluate_lm_into,
    is_lm_config,
    read_zero_shot,
    rebuild_lm,
)
from stackwise_bench.runs import identity, jsonsafe
from stackwise_bench.runs.contract import (
    CHECKPOINTS,
    EVAL_DIR,
    FINISHED,
    SUMMARY,
    ZERO_SHOT_METRICS,
    read_summary,
    zero_shot_task,
)
from stackwise_bench.runs.files import atomic_write_text, claim_new_dir
from stackwise_bench.runs.folders import (
    find_evaluation,
    find_run_dirs,
    recorded_config,
    resolve_checkpoint,
    shown_path,
)
from stackwise_bench.runs.provenance import file_sha256, fingerprint
from stackwise_bench.runs.record import RunRecord, now_iso

log = logging.getLogger(__name__)


def evaluate_checkpoint(
    checkpoint: str | Path,
    quantize: str | None = None,
    keep_head: bool = True,
    activations: bool = False,
    name: str | None = None,
    device: str | None = None,
    dataset: dict | None = None,
    skip_done: bool = False,
    command: str | None = None,
    datasets: dict | None = None,
    group_size: int = GROUP_SIZE_DEFAULT,
    generate: bool = False,
    prompt: str | None = None,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 200,
    seed: int = 1337,
    samples: int = 1,
    export: str | None = None,
    zero_shot: dict | None = None,
) -> dict:
    """Evaluate one checkpoint with its run's config into a new ``<run>/eval/<name>/``; returns that summary.

    Args:
        checkpoint: A run folder (its ``checkpoints/best.pt``) or a ``.pt`` file inside a run folder.
        quantize: None, ``fp8_e4m3`` or ``fp8_e5m2`` (post-training FP8 weights), ``int8`` (per-channel
            symmetric) or ``int4`` (group-wise asymmetric) integer weights.
        keep_head: Keep the classifier head in its trained precision when quantizing.
        activations: Also quantize layer inputs (dynamic, per tensor) when quantizing (FP8 formats only).
        name: Folder name under ``eval/``; taken names get ``_2``, ``_3``, ...
        device: None = the run's ``trainer.device``.
        dataset: ``{"root": ..., "download": ...}``; None values keep the run's own.
        skip_done: Return an existing completed evaluation with the same checkpoint bytes and settings
            instead of evaluating again (what a rerun of ``experiment=FP8Test`` wants).
        command: The command line, recorded in the summary.
        datasets: Loaded datasets by config, shared across calls (``evaluate_study`` reads each once).
        group_size: ``int4``'s weights per scale and zero point; another value with another format is refused.
        generate, prompt, max_new_tokens, temperature, top_k, seed, samples: language models only: also write
            seeded completions of ``prompt`` (:func:`~stackwise_bench.lm_evaluation.write_samples`).
        export: Language models only: also write the tested weights as a ``save_pretrained`` folder there (a new
            or empty folder), which ``model.checkpoint_path=`` loads.
        zero_shot: Language models only: ``{"task": "lambada"|"hellaswag"|"piqa", "path": file, "labels": PIQA's
            .lst or None}``: the task instead of the test pass, into ``eval/<checkpoint>_<task>``
            (:func:`~stackwise_bench.lm_evaluation.zero_shot_test`).

    Raises:
        ConfigError: A missing or corrupt checkpoint, one from a different model, no run folder, bad settings; a
            BERT run (:func:`check_encoder_options`: no samples, zero-shot tasks or exports, no re-test yet).
    """
    _check_quantize_options(quantize, keep_head, activations, group_size)
    run_dir, ckpt = _locate(checkpoint)
    source = read_summary(run_dir) or {}
    run_config = recorded_config(run_dir, source)
    came_from = _origin(ckpt, run_dir, source, run_config)
    language = is_lm_config(run_config)
    task = (zero_shot or {}).get("task")
    check_encoder_options(run_dir, run_config, generate, export, task)
    check_language_options(run_dir, run_config, language, quantize, generate, export, prompt, task)
    zero = read_zero_shot(zero_shot)  # the task's file, read and refused before any model is built
    config = _with_overrides(run_config, device, dataset or {})
    settings = {"checkpoint": ckpt.name, "quantize": quantize, "keep_head": keep_head, "activations": activations}
    if quantize == "int4":  # only there: the other formats' settings (and fingerprints) stay as they were
        settings["group_size"] = group_size
    generation = None
    if generate:  # only then: an evaluation without samples keeps its fingerprint
        generation = {"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": temperature}
        generation |= {"top_k": top_k, "seed": seed, "samples": samples}
        settings["generate"] = generation
    if export is not None:
        settings["export"] = str(export)
    if zero is not None:  # only then: an evaluation without a task keeps its fingerprint
        settings["zero_shot"] = zero.settings
    digest = file_sha256(ckpt)
    fp = hashlib.sha256(json.dumps([digest, settings, config], sort_keys=True, default=str).encode()).hexdigest()[:16]
    base = _check_name(name) if name else _default_name(ckpt, quantize, keep_head, activations, group_size, task)
    if skip_done and (done := find_evaluation(run_dir, base, fp)) is not None:
        log.info("%s: already evaluated with the same %s and settings", shown_path(done["run"]["dir"]), ckpt.name)
        return done
    if source.get("status") not in FINISHED:
        log.warning(
            "%s: the run's status is %s, not completed: %s holds the weights of wherever its training stopped",
            shown_path(run_dir),
            source.get("status") or "unrecorded",
            ckpt.name,
        )
    built = rebuild_lm(config, ckpt) if language else rebuild(config, ckpt, datasets)
    record = RunRecord(claim_new_dir(run_dir / EVAL_DIR / base, sep=NAME_SEP))
    log.info(
        "evaluating %s (epoch %s%s) into %s",
        shown_path(ckpt),
        built.epoch,
        "" if ckpt.name == "best.pt" else f": {ckpt.name}, not the best.pt the run's test metrics came from",
        shown_path(record.dir),
    )
    tested = ckpt.resolve() == (run_dir / CHECKPOINTS / "best.pt").resolve()  # what the run's test metrics came from
    recorded = (source.get("test") or {}).get("loss" if language else "top1") if tested and not zero else None
    provenance = {"fingerprint": fp, "command": command, "settings": settings, "digest": digest, "came_from": came_from}
    _start(record, built, config, run_dir, ckpt, source, recorded, language, provenance)
    try:
        if language:
            evaluate_lm_into(record, built, recorded, generation, export, zero)
        else:
            _evaluate_into(record, built, quantize, keep_head, activations, recorded, group_size)
    except KeyboardInterrupt:
        record.finish("interrupted")
        raise
    except BaseException as exc:
        record.fail(exc)
        raise
    return record.summary


def _start(record: RunRecord, built, config: dict, run_dir: Path, ckpt: Path, source: dict, recorded, language, given):
    """The evaluation's record: ``run`` describes this evaluation (RunRecord's layout; seed and choices are the
    evaluated run's, so an eval folder groups like its run in an analysis), ``source`` the evaluated run."""
    src_run = source.get("run", {})
    record.start(
        kind="evaluate",
        run={
            "name": record.dir.name,
            "dir": str(record.dir.resolve()),
            "fingerprint": given["fingerprint"],
            "command": given["command"],
            "started_at": now_iso(),
            "device": str(built.runtime.device),
            "precision": config["precision"]["name"],
            "seed": config.get("seed"),
            "choices": src_run.get("choices", {}),
            **given["settings"],
        },
        source={
            "dir": str(run_dir.resolve()),
            "checkpoint": str(ckpt.resolve()),
            "checkpoint_sha256": given["digest"],
            "checkpoint_epoch": built.epoch,
            "checkpoint_run": given["came_from"],  # the stamp of the run that wrote it (None: written before stamps)
            "status": source.get("status"),
            "recorded_test_loss" if language else "recorded_test_top1": recorded,
            "run": src_run,
        },
        config=config,
        classes=built.classes,
        # a zero-shot record names its metrics' directions, as a run's task section does (analysis/read/directions)
        **({"task": zero_shot_task(zs["task"])} if (zs := given["settings"].get("zero_shot")) else {}),
    )


def check_encoder_options(run_dir: Path, config: dict, generate: bool, export, zero_shot_task) -> None:
    """Refuse a BERT run (masked LM or GLUE) in one sentence before any work: an encoder has no causal head to sample
    from, score a decoder's zero-shot task with or export as a causal LM, and its re-test is not wired yet."""
    model = config.get("model") or {}
    if model.get("_target_") != BERT_MODEL:
        return
    name, where = model.get("name"), shown_path(run_dir)
    encoder = f"{where} trained model={name}, a BERT encoder with no causal language-model head"
    if generate:
        raise ConfigError(
            f"generate=true samples text from a causal language model, and {encoder}; drop generate=true."
        )
    if zero_shot_task is not None:
        raise ConfigError(
            f"zero_shot.task={zero_shot_task} scores a causal language model's continuations, and {encoder}; drop "
            "zero_shot.task (or point checkpoint= at a gpt_*/llama_* run)."
        )
    if export is not None:
        raise ConfigError(
            f"export={export} writes a causal language model's save_pretrained folder, and {encoder}; drop export= "
            "(a GLUE fine-tune starts from the run folder itself: model.checkpoint_path=<run>)."
        )
    raise ConfigError(
        f"evaluate does not re-test BERT runs yet ({where} trained model={name}); their test metrics are in "
        f"{SUMMARY} (and a GLUE run's predictions in predictions.jsonl)."
    )


def _check_quantize_options(quantize, keep_head: bool, activations: bool, group_size) -> None:
    """The quantization settings, before any run is read: a known format, and each option only where it applies."""
    from stackwise_bench.quant.intq import INT_FORMATS, check_group_size
    from stackwise_bench.quant.ptq import check_format

    if quantize is not None:
        check_format(quantize)
    elif activations or not keep_head:
        raise ConfigError(
            "activations=true and keep_head=false only apply to a quantized model; add quantize=fp8_e4m3 (or fp8_e5m2)."
        )
    if problem := group_size_problem("", quantize, group_size):
        raise ConfigError(problem)
    if quantize in INT_FORMATS and activations:
        raise ConfigError(int_activations_problem("", quantize))
    if quantize == "int4":
        check_group_size(group_size)


def _evaluate_into(record: RunRecord, built, quantize, keep_head, activations, recorded, group_size) -> None:
    import torch

    from stackwise_bench.training.metrics import evaluate

    runtime = built.runtime

    def test(model) -> dict:
        forward = torch.compile(model) if runtime.compile else model
        return evaluate(forward, built.loader, len(built.classes), runtime.autocast, runtime.device, full=True)

    baseline = test(built.model)
    baseline["matches_recorded"] = None if recorded is None else baseline["top1"] == recorded
    if is_quantized_lora(built.model):  # QA-LoRA/QLoRA: what deploys is the merged, integer model
        from stackwise_bench.quant.ptq import degradation
        from stackwise_bench.quant.qalora import merge_quantized_lora

        merge = merge_quantized_lora(built.model, requantize=True)
        merged = test(built.model)
        log.info(
            "%s: test top1 %.2f%% -> %.2f%% merged (%d-bit)",
            shown_path(record.dir),
            baseline["top1"],
            merged["top1"],
            merge["bits"],
        )
        record.update(unmerged=baseline, merge=merge, merge_degradation=degradation(baseline, merged))
        baseline = merged
    if quantize is None:
        record.finish("completed", test=baseline)
        shown = "" if recorded is None else f" (the run recorded {recorded:.2f}%)"
        log.info("%s: test top1 %.2f%%%s", shown_path(record.dir), baseline["top1"], shown)
        return
    from stackwise_bench.quant.ptq import degradation, quantize_model

    model, report = quantize_model(
        built.model, quantize, keep_head=keep_head, activations=activations, group_size=group_size
    )
    after = test(model)
    record.finish("completed", baseline=baseline, test=after, quantize=report, degradation=degradation(baseline, after))
    log.info(
        "%s: test top1 %.2f%% -> %.2f%% in %s (%+.2f points); weights %.3f MB -> %.3f MB",
        shown_path(record.dir),
        baseline["top1"],
        after["top1"],
        quantize,
        after["top1"] - baseline["top1"],
        report["weight_bytes_before"] / 2**20,
        report["weight_bytes_after"] / 2**20,
    )


def is_quantized_lora(model) -> bool:
    """Whether ``model`` carries QA-LoRA/QLoRA layers (``lora.method=qalora|qlora``) still to be merged."""
    from stackwise_bench.quant.qalora import has_quantized_lora

    return has_quantized_lora(model)


def merged_test(model, loaders, runtime) -> dict:
    """The test metrics of a QA-LoRA/QLoRA model as it deploys: adapters merged, weights on the integer grid
    (QA-LoRA merges into the zero points; QLoRA merges into high precision and is quantized again), on a copy.

    Returns the merge report (bits, group size, packed weight bytes, ``on_grid``) with ``top1``, ``top5``,
    ``loss`` and ``f1_macro`` of the merged model.
    """
    import copy

    from stackwise_bench.quant.qalora import merge_quantized_lora
    from stackwise_bench.training.metrics import evaluate

    merged = copy.deepcopy(model)
    report = merge_quantized_lora(merged, requantize=True)
    test = evaluate(merged, loaders.test, loaders.num_classes, runtime.autocast, runtime.device, full=True)
    log.info("merged %s adapters: test top1 %.2f%% on the %d-bit grid", report["method"], test["top1"], report["bits"])
    return {**report, **{k: test[k] for k in ("top1", "top5", "loss", "f1_macro") if k in test}}


def _locate(checkpoint) -> tuple[Path, Path]:
    """``(run_dir, checkpoint file)`` (:func:`resolve_checkpoint`). A file outside any run folder is evaluated
    with the config of the run its stamp names, where that folder is still there; else refused naming that run."""
    try:
        return resolve_checkpoint(checkpoint)
    except ConfigError as exc:
        path = Path(checkpoint).expanduser()
        stamped = identity.read_origin(path) if path.is_file() else None
        if stamped is None:
            raise
        home = Path(stamped["dir"]) if stamped.get("dir") else None
        if home is not None and (home / SUMMARY).is_file():
            shown = shown_path(path)
            log.info("%s lies outside any run folder: evaluating it as %s", shown, identity.describe(stamped))
            return home, path
        raise ConfigError(f"{str(exc).rstrip('.')}: it came from {identity.describe(stamped)}.") from exc


def _origin(ckpt: Path, run_dir: Path, source: dict, config: dict) -> dict | None:
    """The checkpoint's stamp (None for one written before stamps), refused when it names another run than the
    folder whose config evaluate rebuilds the model and data with."""
    stamped = identity.read_origin(ckpt)
    # the run's fingerprint as recorded, and as this version computes it from the recorded config
    fingerprints = tuple(
        dict.fromkeys(f for f in ((source.get("run") or {}).get("fingerprint"), fingerprint(config)) if f)
    )
    problem = identity.mismatch(stamped, fingerprints, None)
    if problem:
        raise ConfigError(
            f"checkpoint={ckpt} {problem}, whose folder {run_dir} gives the config it would be evaluated with; "
            "point checkpoint= at a checkpoint inside the run folder that wrote it."
        )
    return stamped


def _with_overrides(config: dict, device: str | None, dataset: dict) -> dict:
    """A private copy of the run's config with evaluate's ``device=`` and ``dataset.*=`` applied."""
    config = json.loads(json.dumps(config))
    if device is not None:
        config["trainer"]["device"] = device
    for key, value in dataset.items():
        if value is None:
            continue
        if key not in config["dataset"]:
            raise ConfigError(
                f"dataset.{key}={value}: the run's dataset ({config['dataset'].get('_target_')}) has no "
                f"{key} option; drop dataset.{key}."
            )
        config["dataset"][key] = value
    # The checkpoint replaces every weight: never fetch pretrained weights or read the start file again.
    config["model"]["checkpoint_path"] = None
    if not is_lm_config(config):  # a language model has no pretrained= (model.checkpoint_path is its start)
        config["model"]["pretrained"] = False
    return config


# Between the parts of an eval folder's name and before its number: best_fp8_e4m3, last_2 (earlier versions
# numbered last-2: runs.folders.find_evaluation still finds those).
NAME_SEP = "_"


def _default_name(
    ckpt: Path,
    quantize: str | None,
    keep_head: bool,
    activations: bool,
    group_size: int = GROUP_SIZE_DEFAULT,
    task: str | None = None,
) -> str:
    """``<checkpoint>[_<quantize>][_g<group_size> for int4][_act][_qhead][_<zero-shot task>]``, e.g.
    ``best_int4_g32``, ``best_lambada``."""
    parts = [ckpt.stem]
    if quantize is not None:
        parts.append(f"{quantize}_g{group_size}" if quantize == "int4" else quantize)
        parts += ["act"] * activations + ["qhead"] * (not keep_head)
    if task is not None:
        parts.append(task)
    return NAME_SEP.join(parts)


def _check_name(name) -> str:
    name = str(name)
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ConfigError(
            f"name={name} must be a plain folder name (it goes under <run>/eval/); use e.g. name=fp8_test."
        )
    return name


def evaluate_study(
    runs: str,
    quantize: str | None,
    checkpoint: str = "best",
    keep_head: bool = True,
    activations: bool = False,
    out_dir: str | Path | None = None,
    threads: int | None = None,
    device: str | None = None,
    group_size: int = GROUP_SIZE_DEFAULT,
    zero_shot: dict | None = None,
) -> dict:
    """Evaluate every finished run below ``runs`` (one job of ``evaluate --multirun experiment=FP8Test``).

    Each run gets ``<run>/eval/<checkpoint>_<quantize>/`` (or ``<checkpoint>_<task>/`` with a zero-shot task of
    language-model runs; skipped when already done with the same checkpoint bytes, files and settings). A run that
    cannot be evaluated does not stop the others. ``out_dir`` (the sweep job's folder) gets ``evaluations.json``:
    one row per run.

    Returns:
        ``{"status": "completed", "test": {"top1": mean top1 after quantization}, "mean": {...}, "evaluations": rows}``
        (the sweep records ``status``; the app returns ``test.top1``); with a zero-shot task ``test`` and ``mean``
        hold the means of its metrics (``lambada_acc``, ...).

    Raises:
        ConfigError: ``runs`` holds no finished run with that checkpoint, or some runs could not be evaluated
            (after all the others were).
    """
    if not Path(runs).is_dir():
        raise ConfigError(
            f"evaluate.runs={runs} does not exist; train that study first (e.g. python -m "
            "stackwise_bench.train --multirun experiment=AugmFP16) or point evaluate.runs at its folder."
        )
    found = [
        d
        for d in find_run_dirs(runs)
        if (d / CHECKPOINTS / f"{checkpoint}.pt").is_file() and (read_summary(d) or {}).get("status") in FINISHED
    ]
    if not found:
        raise ConfigError(
            f"evaluate.runs={runs} holds no finished run with checkpoints/{checkpoint}.pt; train the "
            "study first (e.g. python -m stackwise_bench.train --multirun experiment=AugmFP16)."
        )
    if threads:
        import torch

        torch.set_num_threads(threads)  # the sweep's share of the cores (the runs' own trainer.threads still win)
    task = (zero_shot or {}).get("task")
    metrics = [f"{task}_{m}" for m in ZERO_SHOT_METRICS.get(task, ())]
    rows, datasets = [], {}
    for run_dir in found:
        row = {"run": str(run_dir)}
        try:
            s = evaluate_checkpoint(
                run_dir / CHECKPOINTS / f"{checkpoint}.pt",
                quantize=quantize,
                keep_head=keep_head,
                activations=activations,
                device=device,
                skip_done=True,
                group_size=group_size,
                datasets=datasets,
                zero_shot=zero_shot,
            )
            row.update(status="completed", eval_dir=s["run"]["dir"], seed=s["run"]["seed"])
            row.update({m: s["test"].get(m) for m in metrics} if task else _quantized_row(s))
        except Exception as exc:  # recorded here (and in its eval folder, if it got one); the others go on
            log.error("%s: %s", shown_path(run_dir), exc)
            row.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        rows.append(row)
    ok = [r for r in rows if r["status"] == "completed"]
    keys = metrics or ["top1_before", "top1", "degradation_points"]
    values = {key: [r[key] for r in ok if r[key] is not None] for key in keys}
    mean = {key: sum(v) / len(v) if v else None for key, v in values.items()}
    if out_dir is not None:
        atomic_write_text(
            Path(out_dir) / "evaluations.json",
            jsonsafe.dumps(
                {
                    "runs": str(runs),
                    "quantize": quantize,
                    "checkpoint": checkpoint,
                    "keep_head": keep_head,
                    "activations": activations,
                    "group_size": group_size if quantize == "int4" else None,
                    "zero_shot": zero_shot if task else None,
                    "mean": mean,
                    "evaluations": rows,
                },
                indent=2,
            )
            + "\n",
        )
    failed = [r for r in rows if r["status"] != "completed"]
    if failed:
        raise ConfigError(
            f"{len(failed)} of {len(rows)} runs below {runs} could not be evaluated (first: "
            f"{failed[0]['run']}: {failed[0]['error']}); the others are done, see evaluations.json."
        )
    test = mean if task else {"top1": mean["top1"]}
    return {"status": "completed", "test": test, "mean": mean, "evaluations": rows}


def _quantized_row(s: dict) -> dict:
    """An evaluation study's row of an image run's record: top-1 before and after, the degradation."""
    return {
        "top1_before": s.get("baseline", s["test"])["top1"],
        "top1": s["test"]["top1"],
        "degradation_points": (s.get("degradation") or {}).get("top1_points"),
    }
