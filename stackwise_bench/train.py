"""``python -m stackwise_bench.train``: compose conf/, build everything, train, leave a run record.

This is the only module that reads ``cfg``: everything it builds takes plain
arguments. :func:`run` does the work and can be called without Hydra's
decorator (tests compose the config with ``hydra.compose`` and call it).
"""

from __future__ import annotations

import os

# cuBLAS needs this before CUDA initialises to have deterministic matmuls.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import logging
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

import hydra
from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, OmegaConf

from stackwise_bench.errors import ConfigError
from stackwise_bench.provenance import config_diff, env_info, fingerprint, git_sha
from stackwise_bench.record import FINISHED, RunRecord, now_iso, read_summary

log = logging.getLogger("stackwise_bench.train")

# conf/hydra/launcher/{joblib,submitit_local,submitit_slurm}.yaml deliberately shadow the plugins'
# options of the same names, so `hydra/launcher=submitit_slurm` gets our defaults; Hydra still
# validates them against the plugin's schema (catching typos) and warns that this is deprecated.
warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema with the same name")

SCHEMA_VERSION = 1  # of summary.json; bump when a key analysis relies on changes meaning


class Loaders(NamedTuple):
    train: object
    val: object
    test: object
    num_classes: int


def instantiate(node, *args, **kwargs):
    """``hydra.utils.instantiate`` that lets our one-sentence ConfigError through unwrapped."""
    try:
        return hydra_instantiate(node, *args, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def run(cfg: DictConfig, run_dir: str | Path, overrides: list[str] | None = None, choices: dict | None = None,
        auto_resume: bool = False, runtime: dict | None = None) -> dict:
    """Train one run described by ``cfg`` into ``run_dir``; returns its summary dict.

    ``auto_resume`` (sweeps): an unfinished run with the same config resumes
    from its ``last.pt`` without ``trainer.resume=true``. ``runtime`` holds
    trainer arguments decided by the launcher (threads, GPU slot) that do not
    change what is trained.
    """
    record = RunRecord(run_dir)
    fp = fingerprint(cfg)
    previous = _check_existing(record, cfg, fp, auto_resume)
    if previous is not None:
        return previous
    resume = bool(cfg.trainer.resume) or (auto_resume and record.summary.get("status") is not None)
    if record.summary.get("status") in ("failed", "interrupted", "running"):
        previous_attempt = {k: record.summary.get(k) for k in ("status", "error")}
        previous_attempt["ended_at"] = record.summary.get("run", {}).get("ended_at")
        record.summary.setdefault("previous_attempts", []).append(previous_attempt)
    record.start(
        schema_version=SCHEMA_VERSION,
        run={"seed": cfg.seed, "study": cfg.get("study"), "overrides": list(overrides or []), "choices": dict(choices or {}), "fingerprint": fp,
             "git_sha": git_sha(), "name": Path(run_dir).name, "dir": str(Path(run_dir).resolve()),
             "started_at": now_iso(), "resumed": resume},
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    try:
        summary = _train(cfg, record, resume, runtime or {})
    except BaseException as exc:
        from stackwise_bench.trainer import TrainingDiverged

        reason = "diverged" if isinstance(exc, TrainingDiverged) else "config" if isinstance(exc, ConfigError) else None
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):  # Ctrl-C twice, or a cluster requeue
            record.finish("interrupted")
        else:
            record.fail(exc, reason=reason)
        raise
    return summary


def _train(cfg: DictConfig, record: RunRecord, resume: bool, runtime: dict) -> dict:
    from stackwise_bench.lora import count_parameters

    trainer = instantiate(cfg.trainer, precision=cfg.precision.name, seed=cfg.seed, resume=resume, **runtime)
    trainer.seed_everything()
    record.update(env=env_info(trainer.device))
    data = instantiate(cfg.dataset)
    if trainer.batch_size > len(data.train_y):
        raise ConfigError(
            f"trainer.batch_size={trainer.batch_size} is larger than the training split of {data.name} "
            f"({len(data.train_y)} images); use trainer.batch_size<={len(data.train_y)}."
        )
    record.write_split(data.split)
    model, shape, fp8_layers = build_model(cfg, data.num_classes)
    if fp8_layers is not None:
        record.update(precision={"name": "fp8", "fp8_layers": fp8_layers})
    record.update(params=count_parameters(model) | shape)
    model = model.to(trainer.device)  # Trainer.fit makes convnets (only) channels_last when asked
    loaders = _loaders(data, instantiate(cfg.augmentation), trainer, img_size=cfg.model.img_size, model=model)
    optimizer = instantiate(cfg.optimizer, model=model)
    scheduler = instantiate(cfg.scheduler, optimizer=optimizer, steps_per_epoch=len(loaders.train),
                            max_epochs=trainer.max_epochs)
    monitors = [instantiate(node) for node in cfg.monitors.values()]
    log.info("training %s on %s (%s, %s) in %s", cfg.model.name, data.name, cfg.precision.name, trainer.device, record.dir)
    result = trainer.fit(model, loaders, optimizer, scheduler, sink=record, monitors=monitors)
    record.finish(result.status, train=result.train, test=result.test, resources=result.resources)
    return record.summary


def build_model(cfg: DictConfig, num_classes: int) -> tuple:
    """The model as it trains: the configured net, LoRA (peft) on top, torchao FP8 layers for precision=fp8.

    ``evaluate`` rebuilds a run's model with this same function. Returns ``(model, shape, fp8_layers)``:
    ``shape`` feeds the LoRA parameter formula, ``fp8_layers`` names the converted layers (None unless fp8).
    """
    from stackwise_bench.lora import apply_lora

    model = instantiate(cfg.model, num_classes=num_classes)
    shape = _model_shape(model, cfg.lora.head)
    model = apply_lora(model, **OmegaConf.to_container(cfg.lora, resolve=True))
    fp8_layers = None
    if cfg.precision.name == "fp8":  # the trainer's check_precision has already refused unsuitable hardware
        from stackwise_bench.fp8 import convert_for_training

        fp8_layers = convert_for_training(model)
    return model, shape, fp8_layers


def _model_shape(model, head_name: str | None) -> dict:
    """Inputs of the LoRA parameter formula (48·d·r + head): the width, depth and head size."""
    head = model.get_submodule(head_name) if head_name and hasattr(model, head_name) else None
    blocks = getattr(model, "blocks", None)
    return {
        "head": sum(p.numel() for p in head.parameters()) if head is not None else None,
        "embed_dim": getattr(model, "embed_dim", None),
        "depth": len(blocks) if blocks is not None else None,
    }


def loader_options(data, trainer, img_size: int, model) -> dict:
    """BatchLoader options shared by every split, here and in ``evaluate`` (which must see the same test pixels).

    Batches are channels_last only for a convnet, the only kind ``Trainer.fit`` converts.
    """
    return dict(device=trainer.device, out_size=img_size, mean=data.mean, std=data.std,
                channels_last=trainer.wants_channels_last(model), seed=trainer.seed,
                on_device=trainer.data_on_device)


def _loaders(data, augment, trainer, img_size: int, model) -> Loaders:
    """The whole dataset goes to the device once; batches are sliced, augmented and resized there."""
    from stackwise_bench.data import BatchLoader

    common = loader_options(data, trainer, img_size, model)
    train = BatchLoader(data.train_x, data.train_y, trainer.batch_size, augment=augment if augment.enabled else None,
                        shuffle=True, drop_last=True, **common)
    val = BatchLoader(data.val_x, data.val_y, trainer.eval_batch_size, **common)
    test = BatchLoader(data.test_x, data.test_y, trainer.eval_batch_size, **common)
    return Loaders(train, val, test, data.num_classes)


def _check_existing(record: RunRecord, cfg: DictConfig, fp: str, auto_resume: bool) -> dict | None:
    """Never overwrite: a finished run is returned as is; a different config is refused."""
    old = record.summary
    if not old:
        return None
    old_fp = old.get("run", {}).get("fingerprint")
    if old_fp != fp:
        diff = config_diff(old.get("config", {}), OmegaConf.to_container(cfg, resolve=True))
        raise ConfigError(
            f"hydra.run.dir={record.dir} already holds a run with a different config ({diff}); "
            "choose another hydra.run.dir (or study) instead of overwriting it."
        )
    if old.get("status") in FINISHED:
        log.info("%s is already %s with the same config: nothing to do", record.dir, old["status"])
        return old
    if not (cfg.trainer.resume or auto_resume):
        raise ConfigError(
            f"hydra.run.dir={record.dir} already holds a {old.get('status')} run; set trainer.resume=true to continue it "
            "from checkpoints/last.pt, or choose another hydra.run.dir."
        )
    return None


OmegaConf.register_new_resolver("sb.n_jobs", lambda: __import__("stackwise_bench.sweep").sweep.default_n_jobs(),
                                replace=True)


# conf/ sits next to the package (editable install). An absolute path works whether this module
# runs as __main__ or is imported by a launcher's worker process.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    """One job: train, or (in a sweep) skip/resume it, and report its outcome to the study."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    sweeping = hc.mode == RunMode.MULTIRUN
    run_dir = Path(hc.runtime.output_dir)
    before = read_summary(run_dir)
    status, reason, summary = "failed", "", {}
    try:
        if sweeping:
            from stackwise_bench.sweep import check_launch_record

            refused = check_launch_record(Path(hc.sweep.dir), hc.job.override_dirname, fingerprint(cfg))
            if refused:
                raise ConfigError(refused)
        if cfg.get("evaluate") is not None:  # an evaluation preset (experiment=FP8Test): evaluates runs, trains nothing
            from stackwise_bench.evaluate import evaluate_study

            summary = evaluate_study(**OmegaConf.to_container(cfg.evaluate, resolve=True), out_dir=run_dir,
                                     **(_job_runtime(cfg, hc) if sweeping else {}))
        else:
            summary = run(cfg, run_dir, overrides=list(hc.overrides.task),
                          choices=OmegaConf.to_container(hc.runtime.choices),
                          auto_resume=sweeping, runtime=_job_runtime(cfg, hc) if sweeping else None)
        status = summary["status"]
        if before and before.get("run", {}).get("started_at") == summary.get("run", {}).get("started_at"):
            status = "skipped"
    except ConfigError as exc:
        log.error("%s", exc)
        if not sweeping:
            sys.exit(2)
        status, reason = "refused" if before and before.get("status") in FINISHED else "failed", str(exc)
    except Exception as exc:
        if not sweeping:
            raise
        status, reason = "failed", _one_line(exc)
        if reason.startswith("diverged"):
            log.error("job %s %s", hc.job.override_dirname, reason)
        else:
            log.exception("job %s failed", hc.job.override_dirname)
    finally:
        _release_memory()
    if sweeping:
        from stackwise_bench.sweep import record_outcome

        record_outcome(Path(hc.sweep.dir), hc.job.override_dirname, status, reason)
    return (summary.get("test") or {}).get("top1")


def _job_runtime(cfg: DictConfig, hc) -> dict:
    """Threads and GPU for one parallel job: jobs x threads never exceed the cores; one GPU per slot."""
    from stackwise_bench.sweep import visible_gpus

    runtime = {}
    n_jobs = hc.launcher.get("n_jobs") or 1
    n_jobs = os.cpu_count() if n_jobs < 0 else n_jobs
    cpus = hc.launcher.get("cpus_per_task") or max(1, (os.cpu_count() or 1) // max(1, n_jobs))
    if cfg.trainer.threads is None:
        runtime["threads"] = cpus
    gpus = visible_gpus()
    if gpus > 1 and cfg.trainer.device == "auto":
        runtime["device"] = f"cuda:{hc.job.num % gpus}"
    return runtime


def _one_line(exc: BaseException) -> str:
    from stackwise_bench.trainer import TrainingDiverged

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    prefix = "diverged" if isinstance(exc, TrainingDiverged) else type(exc).__name__
    return f"{prefix}: {text}"[:200]


def _release_memory() -> None:
    """Joblib reuses worker processes: hand cached GPU memory back between jobs."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


if __name__ == "__main__":
    # Run the importable copy, so launchers pickle `stackwise_bench.train.main` by reference
    # and worker processes import this module (and its resolvers) normally.
    from stackwise_bench.train import main as entry

    entry()
