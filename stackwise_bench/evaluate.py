"""``python -m stackwise_bench.evaluate checkpoint=<run folder or .pt> [quantize=fp8_e4m3] [key=value ...]``.

Rebuilds a run's data and model from the run's own config exactly as ``train.py``
does, loads the checkpoint (``weights_only=True``), evaluates the test split, and
writes ``<run>/eval/<name>/summary.json`` (atomically, never over an existing
folder). With ``quantize=fp8_e4m3|fp8_e5m2`` the weights are also quantized after
the baseline pass (:mod:`stackwise_bench.quantize`), and the summary holds both
passes, the degradation in points and the weight bytes.

Keys and defaults: ``conf/evaluate.yaml``. Not a Hydra app on purpose: Hydra's
override grammar rejects the ``=`` in sweep job folders (``multirun/AugmFP16/seed=42``);
``OmegaConf.from_dotlist`` splits each argument at its first ``=``, as ``analyze`` does.
Exit status: 0 done, 2 bad input (one sentence on stderr).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import NamedTuple

from stackwise_bench.errors import ConfigError
from stackwise_bench.record import RunRecord, atomic_write_text, claim_new_dir, now_iso, read_summary

log = logging.getLogger("stackwise_bench.evaluate")

CONF = Path(__file__).resolve().parents[1] / "conf" / "evaluate.yaml"
DONE = ("completed", "early_stopped")
USAGE = ("usage: python -m stackwise_bench.evaluate checkpoint=<run folder>|<file.pt> [quantize=fp8_e4m3|fp8_e5m2] "
         "[keep_head=true] [activations=false] [name=<folder>] [device=cpu|cuda] [dataset.root=<dir>]")


def parse_args(argv: list[str]) -> dict:
    """``key=value`` arguments over the defaults in ``conf/evaluate.yaml``; ConfigError for an unknown key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    defaults = OmegaConf.to_container(OmegaConf.load(CONF))
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not key=value; {USAGE}")
        key = arg.split("=", 1)[0]
        top, _, sub = key.partition(".")
        if top not in defaults or (sub and sub not in (defaults[top] if isinstance(defaults[top], dict) else {})):
            raise ConfigError(f"unknown key {key!r}; the keys are {', '.join(_keys(defaults))}.")
    try:
        given = OmegaConf.to_container(OmegaConf.from_dotlist(list(argv)))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"could not parse the arguments ({exc}); {USAGE}") from exc
    args = {**defaults, **given, "dataset": {**defaults["dataset"], **given.get("dataset", {})}}
    if not args["checkpoint"]:
        raise ConfigError(f"checkpoint= is missing: name a run folder or a .pt file inside one; {USAGE}")
    for key in ("keep_head", "activations"):
        if not isinstance(args[key], bool):
            raise ConfigError(f"{key}={args[key]} must be true or false.")
    return args


def _keys(tree: dict, prefix: str = "") -> list[str]:
    return [k for key, v in tree.items() for k in (_keys(v, f"{prefix}{key}.") if isinstance(v, dict) else [prefix + key])]


def evaluate_checkpoint(checkpoint: str | Path, quantize: str | None = None, keep_head: bool = True,
                        activations: bool = False, name: str | None = None, device: str | None = None,
                        dataset: dict | None = None, skip_done: bool = False, command: str | None = None) -> dict:
    """Evaluate one checkpoint with its run's config into a new ``<run>/eval/<name>/``; returns that summary.

    Args:
        checkpoint: A run folder (its ``checkpoints/best.pt``) or a ``.pt`` file inside a run folder.
        quantize: None, ``fp8_e4m3`` or ``fp8_e5m2`` (post-training FP8 weights).
        keep_head: Keep the classifier head in its trained precision when quantizing.
        activations: Also quantize layer inputs (dynamic, per tensor) when quantizing.
        name: Folder name under ``eval/``; taken names get ``-2``, ``-3``, ...
        device: None = the run's ``trainer.device``.
        dataset: ``{"root": ..., "download": ...}``; None values keep the run's own.
        skip_done: Return an existing completed evaluation with the same checkpoint bytes and settings
            instead of evaluating again (what a rerun of ``experiment=FP8Test`` wants).
        command: The command line, recorded in the summary.

    Raises:
        ConfigError: A missing or corrupt checkpoint, one from a different model, no run folder, bad settings.
    """
    from stackwise_bench.quantize import format_dtype

    if quantize is not None:
        format_dtype(quantize)
    elif activations or not keep_head:
        raise ConfigError("activations=true and keep_head=false only apply to a quantized model; "
                          "add quantize=fp8_e4m3 (or fp8_e5m2).")
    run_dir, ckpt = resolve_checkpoint(checkpoint)
    source = read_summary(run_dir) or {}
    config = _run_config(run_dir, source, device, dataset or {})
    settings = {"checkpoint": ckpt.name, "quantize": quantize, "keep_head": keep_head, "activations": activations}
    digest = _sha256(ckpt)
    fp = hashlib.sha256(json.dumps([digest, settings, config], sort_keys=True, default=str).encode()).hexdigest()[:16]
    base = _check_name(name) if name else _default_name(ckpt, quantize, keep_head, activations)
    if skip_done and (done := _find_done(run_dir / "eval", base, fp)) is not None:
        log.info("%s: already evaluated with the same checkpoint and settings", done["run"]["dir"])
        return done
    built = _build(config, ckpt)
    record = RunRecord(claim_new_dir(run_dir / "eval" / base, sep="-"))
    tested = ckpt.resolve() == (run_dir / "checkpoints" / "best.pt").resolve()  # what the run's test metrics came from
    recorded = (source.get("test") or {}).get("top1") if tested else None
    src_run = source.get("run", {})
    # "run" describes this evaluation (RunRecord's layout); seed and choices are the evaluated run's, so an
    # eval folder groups like its run in an analysis. "source" is the evaluated run itself.
    record.start(kind="evaluate",
                 run={"name": record.dir.name, "dir": str(record.dir.resolve()), "fingerprint": fp, "command": command,
                      "started_at": now_iso(), "device": str(built.device), "precision": config["precision"]["name"],
                      "seed": config.get("seed"), "choices": src_run.get("choices", {}), **settings},
                 source={"dir": str(run_dir.resolve()), "checkpoint": str(ckpt.resolve()), "checkpoint_sha256": digest,
                         "checkpoint_epoch": built.epoch, "status": source.get("status"),
                         "recorded_test_top1": recorded, "run": src_run},
                 config=config, classes=built.classes)
    try:
        _evaluate_into(record, built, quantize, keep_head, activations, recorded)
    except KeyboardInterrupt:
        record.finish("interrupted")
        raise
    except BaseException as exc:
        record.fail(exc)
        raise
    return record.summary


def _evaluate_into(record: RunRecord, built, quantize, keep_head, activations, recorded) -> None:
    import torch

    from stackwise_bench.metrics import evaluate

    def test(model) -> dict:
        forward = torch.compile(model) if built.compile else model
        return evaluate(forward, built.loader, len(built.classes), built.amp, built.device, full=True)

    baseline = test(built.model)
    baseline["matches_recorded"] = None if recorded is None else baseline["top1"] == recorded
    if quantize is None:
        record.finish("completed", test=baseline)
        log.info("%s: test top1 %.2f%% (recorded %s)", record.dir, baseline["top1"], recorded)
        return
    from stackwise_bench.quantize import degradation, quantize_model

    model, report = quantize_model(built.model, quantize, keep_head=keep_head, activations=activations)
    after = test(model)
    record.finish("completed", baseline=baseline, test=after, quantize=report, degradation=degradation(baseline, after))
    log.info("%s: test top1 %.2f%% -> %.2f%% in %s (%+.2f points); weights %.3f MB -> %.3f MB",
             record.dir, baseline["top1"], after["top1"], quantize, after["top1"] - baseline["top1"],
             report["weight_bytes_before"] / 2**20, report["weight_bytes_after"] / 2**20)


def resolve_checkpoint(checkpoint: str | Path) -> tuple[Path, Path]:
    """``(run_dir, checkpoint file)`` from a run folder or a ``.pt`` path inside one."""
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        ckpt = path / "checkpoints" / "best.pt"
        if not ckpt.is_file():
            raise ConfigError(f"checkpoint={checkpoint} is a folder without checkpoints/best.pt; point checkpoint= at a "
                              "run folder whose training finished at least one epoch, or at a .pt file inside one.")
        return path, ckpt
    if not path.is_file():
        raise ConfigError(f"checkpoint={checkpoint} does not exist; point it at a run folder or a .pt file inside one.")
    for parent in path.resolve().parents:
        if (parent / "summary.json").is_file() or (parent / ".hydra" / "config.yaml").is_file():
            return parent, path
    raise ConfigError(f"checkpoint={checkpoint} is not inside a run folder (no summary.json or .hydra/config.yaml "
                      "above it), so its model and data are unknown; point it at a checkpoint under a run's checkpoints/.")


def _run_config(run_dir: Path, source: dict, device: str | None, dataset: dict) -> dict:
    """The run's resolved config (summary.json, else .hydra/config.yaml) with the allowed overrides applied."""
    from omegaconf import OmegaConf

    config = source.get("config")
    if not config and (run_dir / ".hydra" / "config.yaml").is_file():
        config = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"), resolve=True)
    if not isinstance(config, dict) or not {"model", "dataset", "trainer", "precision", "lora"} <= set(config):
        raise ConfigError(f"checkpoint: {run_dir} has no usable run config (summary.json 'config' or .hydra/config.yaml); "
                          "evaluate a folder written by python -m stackwise_bench.train.")
    config = json.loads(json.dumps(config))  # a private copy
    if device is not None:
        config["trainer"]["device"] = device
    for key, value in dataset.items():
        if value is None:
            continue
        if key not in config["dataset"]:
            raise ConfigError(f"dataset.{key}={value}: the run's dataset ({config['dataset'].get('_target_')}) has no "
                              f"{key} option; drop dataset.{key}.")
        config["dataset"][key] = value
    # The checkpoint replaces every weight: never fetch pretrained weights or read the start file again.
    config["model"].update(pretrained=False, checkpoint_path=None)
    return config


class Built(NamedTuple):
    """What one evaluation needs: the model with the checkpoint loaded, the test loader, the autocast."""

    model: object
    loader: object
    amp: object
    device: object
    compile: bool
    classes: list
    epoch: int | None


def _build(config: dict, ckpt: Path) -> Built:
    """Data, model (+ LoRA) and the test loader exactly as ``train.py`` builds them; the checkpoint loaded."""
    import torch
    from omegaconf import OmegaConf

    from stackwise_bench.data import BatchLoader
    from stackwise_bench.lora import apply_lora
    from stackwise_bench.train import instantiate, loader_options
    from stackwise_bench.trainer import is_convnet

    cfg = OmegaConf.create(config)
    trainer = instantiate(cfg.trainer, precision=cfg.precision.name, seed=cfg.seed, resume=False)
    trainer.seed_everything()
    state, epoch = _load_state(ckpt, trainer.device)
    data = instantiate(cfg.dataset)
    model = instantiate(cfg.model, num_classes=data.num_classes)
    model = apply_lora(model, **OmegaConf.to_container(cfg.lora, resolve=True))
    model = model.to(trainer.device)
    if trainer.channels_last and is_convnet(model):  # as Trainer.fit does before training
        model = model.to(memory_format=torch.channels_last)
    _load_weights(model, state, ckpt, cfg)
    if cfg.precision.name == "fp8":  # as train.py does for FP8 training (check_precision has refused elsewhere)
        from stackwise_bench.fp8 import convert_for_training

        convert_for_training(model)
    loader = BatchLoader(data.test_x, data.test_y, trainer.eval_batch_size,
                         **loader_options(data, trainer, cfg.model.img_size))
    return Built(model=model, loader=loader, amp=trainer.amp, device=trainer.device, compile=trainer.compile,
                  classes=list(data.classes), epoch=epoch)


def _load_state(ckpt: Path, device) -> tuple[dict, int | None]:
    import torch

    from stackwise_bench.models import _short

    try:
        obj = torch.load(ckpt, map_location=device, weights_only=True)
    except Exception as exc:  # zip, unpickling and format errors all mean the same to the user
        raise ConfigError(f"checkpoint={ckpt} could not be read as a torch checkpoint ({_short(exc)}); the file is "
                          "corrupt or truncated: point checkpoint= at another file (e.g. checkpoints/last.pt) "
                          "or rerun the training that wrote it.") from exc
    state = obj.get("model") if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ConfigError(f"checkpoint={ckpt} holds no model state_dict; point it at a checkpoint written by the trainer "
                          "(checkpoints/best.pt or last.pt).")
    progress = obj.get("progress") if isinstance(obj, dict) else None
    return state, (progress or {}).get("epoch")


def _load_weights(model, state: dict, ckpt: Path, cfg) -> None:
    from stackwise_bench.models import _mismatch

    problem = _mismatch(state, model.state_dict())
    if problem:
        lora = f" with LoRA rank {cfg.lora.rank}" if cfg.lora.rank else ""
        raise ConfigError(f"checkpoint={ckpt} does not fit the run's model {cfg.model.name}{lora} ({problem}); it was "
                          "saved from a different model: point checkpoint= at a checkpoint written by this run.")
    model.load_state_dict(state)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _default_name(ckpt: Path, quantize: str | None, keep_head: bool, activations: bool) -> str:
    if quantize is None:
        return ckpt.stem
    return ckpt.stem + f"_{quantize}" + ("_act" if activations else "") + ("" if keep_head else "_qhead")


def _check_name(name) -> str:
    name = str(name)
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ConfigError(f"name={name} must be a plain folder name (it goes under <run>/eval/); use e.g. name=fp8_test.")
    return name


def _find_done(parent: Path, base: str, fp: str) -> dict | None:
    if not parent.is_dir():
        return None
    for path in sorted(parent.iterdir()):
        if path.name == base or path.name.startswith(base + "-"):
            summary = read_summary(path) or {}
            if summary.get("status") == "completed" and summary.get("run", {}).get("fingerprint") == fp:
                return summary
    return None


def evaluate_study(runs: str, quantize: str | None, checkpoint: str = "best", keep_head: bool = True,
                   activations: bool = False, out_dir: str | Path | None = None, threads: int | None = None,
                   device: str | None = None) -> dict:
    """Evaluate every finished run below ``runs`` (``experiment=FP8Test``: ``train.py`` hands over here).

    Each run gets ``<run>/eval/<checkpoint>_<quantize>/`` (skipped when already done with the same
    checkpoint bytes and settings). A run that cannot be evaluated does not stop the others.
    ``out_dir`` (the sweep job's folder) gets ``evaluations.json``: one row per run.

    Returns:
        ``{"status": "completed", "test": {"top1": mean top1 after quantization}, "mean": {...}, "evaluations": rows}``
        (the sweep records ``status``; ``train.py``'s main returns ``test.top1``).

    Raises:
        ConfigError: ``runs`` holds no finished run with that checkpoint, or some runs could not be evaluated
            (after all the others were).
    """
    from stackwise_bench.analysis.collect import find_run_dirs

    if not Path(runs).is_dir():
        raise ConfigError(f"evaluate.runs={runs} does not exist; train that study first (e.g. python -m "
                          "stackwise_bench.train --multirun experiment=AugmFP16) or point evaluate.runs at its folder.")
    found = [d for d in find_run_dirs(runs) if (d / "checkpoints" / f"{checkpoint}.pt").is_file()
             and (read_summary(d) or {}).get("status") in DONE]
    if not found:
        raise ConfigError(f"evaluate.runs={runs} holds no finished run with checkpoints/{checkpoint}.pt; train the "
                          "study first (e.g. python -m stackwise_bench.train --multirun experiment=AugmFP16).")
    if threads:
        import torch

        torch.set_num_threads(threads)  # the sweep's share of the cores (the runs' own trainer.threads still win)
    rows = []
    for run_dir in found:
        row = {"run": str(run_dir)}
        try:
            s = evaluate_checkpoint(run_dir / "checkpoints" / f"{checkpoint}.pt", quantize=quantize, keep_head=keep_head,
                                    activations=activations, device=device, skip_done=True)
            row.update(status="completed", eval_dir=s["run"]["dir"], seed=s["run"]["seed"],
                       top1_before=s.get("baseline", s["test"])["top1"], top1=s["test"]["top1"],
                       degradation_points=(s.get("degradation") or {}).get("top1_points"))
        except Exception as exc:  # recorded here (and in its eval folder, if it got one); the others go on
            log.error("%s: %s", run_dir, exc)
            row.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        rows.append(row)
    ok = [r for r in rows if r["status"] == "completed"]
    values = {key: [r[key] for r in ok if r[key] is not None] for key in ("top1_before", "top1", "degradation_points")}
    mean = {key: sum(v) / len(v) if v else None for key, v in values.items()}
    if out_dir is not None:
        atomic_write_text(Path(out_dir) / "evaluations.json", json.dumps(
            {"runs": str(runs), "quantize": quantize, "checkpoint": checkpoint, "keep_head": keep_head,
             "activations": activations, "mean": mean, "evaluations": rows}, indent=2) + "\n")
    failed = [r for r in rows if r["status"] != "completed"]
    if failed:
        raise ConfigError(f"{len(failed)} of {len(rows)} runs below {runs} could not be evaluated (first: "
                          f"{failed[0]['run']}: {failed[0]['error']}); the others are done, see evaluations.json.")
    return {"status": "completed", "test": {"top1": mean["top1"]}, "mean": mean, "evaluations": rows}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "help") for a in argv):
        print(__doc__.strip() + "\n\n" + USAGE)
        return 0
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    try:
        args = parse_args(argv)
        command = "python -m stackwise_bench.evaluate " + " ".join(shlex.quote(a) for a in argv)
        summary = evaluate_checkpoint(**args, command=command)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary["run"]["dir"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
