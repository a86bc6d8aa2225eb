"""``python -m stackwise_bench.train``: compose conf/, build everything, train, leave a run record.

The composition root of a training run: :func:`run` opens the run record (which
refuses to overwrite a different run), builds every object from the config
(:mod:`stackwise_bench.build`), hands them to the Trainer and records the result.
:func:`main` is the Hydra app; the protocol around one job of a sweep (launch
check, threads and GPU slot, outcome) is :func:`stackwise_bench.runs.job.run_job`.
Tests compose the config with ``hydra.compose`` and call :func:`run` directly.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from stackwise_bench.build import build_run
from stackwise_bench.configs import CONF_DIR
from stackwise_bench.errors import ConfigError
from stackwise_bench.runs.job import Job, run_job
from stackwise_bench.runs.provenance import env_info, fingerprint, git_sha
from stackwise_bench.runs.record import RunRecord, now_iso

log = logging.getLogger("stackwise_bench.train")


def run(
    cfg: DictConfig,
    run_dir: str | Path,
    overrides: list[str] | None = None,
    choices: dict | None = None,
    auto_resume: bool = False,
    threads: int | None = None,
    device: str | None = None,
) -> dict:
    """Train one run described by ``cfg`` into ``run_dir``; returns its summary dict.

    ``auto_resume`` (sweeps): an unfinished run with the same config resumes from its ``last.pt``
    without ``trainer.resume=true``. ``threads`` and ``device`` are a sweep job's share of the machine.
    """
    if cfg.get("evaluate") is not None:
        raise ConfigError(
            "experiment=FP8Test evaluates finished runs and trains nothing; launch it with "
            "python -m stackwise_bench.evaluate --multirun experiment=FP8Test."
        )
    record = RunRecord(run_dir)
    config = OmegaConf.to_container(cfg, resolve=True)
    fp = fingerprint(config)
    may_resume = bool(cfg.trainer.resume) or auto_resume
    finished = record.prepare(config, fp, may_resume=may_resume)
    if finished is not None:
        return finished
    resume = may_resume and record.can_resume()  # "resumed" only where a last.pt is there to continue
    record.start(
        run={
            "seed": cfg.seed,
            "study": cfg.get("study"),
            "overrides": list(overrides or []),
            "choices": dict(choices or {}),
            "fingerprint": fp,
            "git_sha": git_sha(),
            "name": Path(run_dir).name,
            "dir": str(Path(run_dir).resolve()),
            "started_at": now_iso(),
            "resumed": resume,
        },
        config=config,
    )
    from stackwise_bench.nn.lora import count_parameters  # imports torch: once a run starts, not for --help

    try:
        built = build_run(cfg, resume=resume, threads=threads, device=device)
        record.update(env=env_info(built.runtime.device))
        record.write_split(built.data.split)
        if built.fp8_layers is not None:
            record.update(precision={"name": "fp8", "fp8_layers": built.fp8_layers})
        record.update(params=count_parameters(built.model) | built.model_shape)
        log.info(
            "training %s on %s (%s, %s) in %s",
            cfg.model.name,
            built.data.name,
            cfg.precision.name,
            built.runtime.device,
            record.dir,
        )
        result = built.trainer.fit(
            built.model, built.loaders, built.optimizer, built.scheduler, sink=record, monitors=built.monitors
        )
    except BaseException as exc:
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):  # Ctrl-C twice, or a cluster requeue
            record.finish("interrupted")
        else:
            record.fail(exc, reason=getattr(exc, "reason", None))
        raise
    record.finish(result.status, train=result.train, test=result.test, resources=result.resources)
    return record.summary


def train_job(cfg: DictConfig, job: Job) -> dict:
    """One Hydra job of training (single or in a sweep), for :func:`~stackwise_bench.runs.job.run_job`."""
    return run(
        cfg,
        job.run_dir,
        overrides=job.overrides,
        choices=job.choices,
        auto_resume=job.sweeping,
        threads=job.threads,
        device=job.device,
    )


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    """The Hydra app: one training job; returns its test top-1 (what Hydra's sweepers read)."""
    return run_job(cfg, train_job)


if __name__ == "__main__":
    # Run the importable copy, so launchers pickle `stackwise_bench.train.main` by reference
    # and worker processes import this module (and its resolvers) normally.
    from stackwise_bench.train import main as entry

    entry()
