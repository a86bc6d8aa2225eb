"""``python -m stackwise_bench.train``: compose conf/, build everything, train, leave a run record.

The composition root of a training run: :func:`run` opens the run record (which
refuses to overwrite a different run), builds every object from the config
(:mod:`stackwise_bench.build`), hands them to the Trainer and records the result.
:func:`main` is the Hydra app; the protocol around one job of a sweep (launch
check, threads and GPU slot, outcome) is :func:`stackwise_bench.runs.job.run_job`.
Tests compose the config with ``hydra.compose`` and call :func:`run` directly.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from stackwise_bench.build import adapter_record, build_run, model_shape
from stackwise_bench.configs import CONF_DIR
from stackwise_bench.data.splits import check_resumed_split
from stackwise_bench.errors import ConfigError
from stackwise_bench.evaluation import is_quantized_lora, merged_test
from stackwise_bench.knobs import check_config
from stackwise_bench.runs import lease, output_dir
from stackwise_bench.runs.folders import shown_path
from stackwise_bench.runs.job import Job, ranks_launched, run_job
from stackwise_bench.runs.provenance import env_info, fingerprint, git_sha
from stackwise_bench.runs.record import ADDITIVE, RunRecord, now_iso
from stackwise_bench.training.stop import StopSignal

log = logging.getLogger("stackwise_bench.train")


def run(
    cfg: DictConfig,
    run_dir: str | Path,
    overrides: list[str] | None = None,
    choices: dict | None = None,
    auto_resume: bool = False,
    threads: int | None = None,
    device: str | None = None,
    ranks=None,
) -> dict:
    """Train one run described by ``cfg`` into ``run_dir``; returns its summary dict.

    ``auto_resume`` (sweeps): an unfinished run with the same config resumes from its ``last.pt``
    without ``trainer.resume=true``. ``threads`` and ``device`` are a sweep job's share of the machine.
    ``ranks``: on several devices, rank 0's :class:`~stackwise_bench.training.ranks.Ranks` (this process writes
    the record; the other ranks are told whether and how to train, :func:`follow`).
    """
    if cfg.get("evaluate") is not None:
        raise ConfigError(
            "experiment=FP8Test evaluates finished runs and trains nothing; launch it with "
            "python -m stackwise_bench.evaluate --multirun experiment=FP8Test."
        )
    config = OmegaConf.to_container(cfg, resolve=True)
    fp = fingerprint(config)
    may_resume = bool(cfg.trainer.resume) or auto_resume
    knobs = cfg.get("lease") or {}
    # The stop handler covers the whole run (a signal in the test phase or while recording still saves and
    # records); the lease makes this process the folder's one writer until the record is final.
    group = ranks.group if ranks is not None else None
    with StopSignal() as stop, telling(group) as tell:
        with lease.acquire(run_dir, knobs.get("timeout_s", 120), knobs.get("on_busy", "skip")) as held:
            record = RunRecord(run_dir, fence=held.check)  # once the lease is another's, nothing more is written
            attempts = len(record.summary.get("previous_attempts", []))
            finished = record.prepare(config, fp, may_resume=may_resume)
            if finished is not None:
                return finished
            if held.took_over is not None:
                note_takeover(
                    record, held.took_over, new_attempt=len(record.summary.get("previous_attempts", [])) > attempts
                )
            resume = may_resume and record.can_resume()  # "resumed" only where a last.pt is there to continue
            if resume:
                threads = resume_threads(record.summary, cfg.trainer.get("threads"), threads)
                resume_world(record.summary, group.size if group else 1)
            else:
                record.restart_logs()
            record.start(run=run_section(cfg, run_dir, fp, overrides, choices, held.content, resume), config=config)
            from stackwise_bench.nn.lora import count_parameters  # imports torch: once a run starts, not for --help
            from stackwise_bench.training import group_sink
            from stackwise_bench.training.distributed import SINGLE

            try:
                check_config(cfg)  # every knob's type and range, before anything is built
                tell({"resume": resume, "threads": threads})
                built = build_run(cfg, resume=resume, threads=threads, device=device, group=group)
                record.update(env=env_info(built.runtime.device) | (group or SINGLE).describe())
                if resume:  # it continues only on the split it was trained on
                    check_resumed_split(record.dir, built.data.split)
                record.write_split(built.data.split)
                # the class names (the confusion matrix's labels) and what the dataset says of itself (imagefolder:
                # its cache and the images it skipped with dataset.skip_bad=true)
                notes = getattr(built.data, "notes", None) or {}
                record.update(data={"name": built.data.name, "classes": list(built.data.classes), **notes})
                if built.fp8_layers is not None:
                    record.update(precision={"name": "fp8", "fp8_layers": built.fp8_layers})
                record.update(params=count_parameters(built.model, cfg.lora.head) | built.model_shape)
                record.update(adapter=adapter_record(cfg, built.model))
                if built.sections:
                    record.update(**built.sections)
                record.attach(built.loggers)
                log.info(
                    "training %s on %s (%s, %s) in %s",
                    cfg.model.name,
                    built.data.name,
                    cfg.precision.name,
                    built.runtime.device,
                    shown_path(record.dir),
                )
                result = built.trainer.fit(
                    built.model,
                    built.loaders,
                    built.optimizer,
                    built.scheduler,
                    sink=record if group is None else group_sink.LeaderSink(record, group),
                    task=built.task,
                    monitors=built.monitors,
                    stop=stop,
                    parts=built.parts,
                    regime=built.regime,
                )
                record.update(**result.sections)  # the task's, and the parts' (AdaLoRA: the ranks it ended with)
                if result.test and hasattr(built.task, "prediction_rows"):  # GLUE: the test rows' predictions
                    record.write_predictions(built.task.prediction_rows())
                if result.status != "interrupted" and is_quantized_lora(built.model):
                    record.update(adapter={"merged": merged_test(built.model, built.loaders, built.runtime)})
            except BaseException as exc:
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):  # Ctrl-C twice, or a cluster requeue
                    record.summary["run"]["stopped_by"] = stop.requested or type(exc).__name__
                    try:
                        record.finish("interrupted")
                    except OSError as io:  # a full disk must not hide the interrupt
                        log.error("the interruption of %s could not be recorded: %s", record.dir, io)
                else:
                    original, exc = exc, ranks.explain(exc) if ranks is not None else exc  # another rank's, if first
                    record.fail(exc)
                    if exc is not original:
                        raise exc from None
                raise
            if result.status == "interrupted":
                record.summary["run"]["stopped_by"] = stop.requested
            if built.regime.name != "classical":  # the model grew: record what it ended as, the tested model (best.pt
                # is chosen at the final depth; test.checkpoint_params counts the same model)
                record.update(
                    params=count_parameters(built.model, cfg.lora.head) | model_shape(built.model, cfg.lora.head)
                )
            resources = run_resources(result.resources, record.summary.get("previous_attempts", []))
            record.finish(result.status, train=result.train, test=result.test, resources=resources)
        stop.chain()  # under submitit, a SIGUSR2 (preemption) now requeues the job, which resumes from last.pt
    return record.summary


@contextlib.contextmanager
def telling(group):
    """Rank 0's one message to the other ranks of its run: whether to train (``tell(how)``), or, where it leaves
    without saying (the run was finished, a refusal, a busy folder), that they have nothing to do."""
    said = []

    def tell(how: dict) -> None:
        if group is not None:
            group.broadcast(how)
        said.append(how)

    try:
        yield tell
    finally:
        if group is not None and not said:
            try:
                group.broadcast(None)
            except RuntimeError as exc:  # they are gone already (a rank failed): there is nobody left to tell
                log.debug("telling the other ranks to stop: %s", exc)


def follow(group, cfg: DictConfig, run_dir: str | Path) -> None:
    """A rank > 0 of a run on several devices: build what rank 0 builds and train beside it, writing nothing.

    Rank 0 decides (the folder, a resume, the threads) and holds the record; it says whether to train at all.
    """
    how = group.broadcast(None)
    if how is None:
        return
    from stackwise_bench.training.group_sink import FollowerSink

    logging.getLogger("stackwise_bench").setLevel(logging.WARNING)  # rank 0 logs the run once
    with StopSignal() as stop:
        built = build_run(cfg, resume=how["resume"], threads=how["threads"], group=group)
        built.trainer.fit(
            built.model,
            built.loaders,
            built.optimizer,
            built.scheduler,
            sink=FollowerSink(group, run_dir, built.runtime.device),
            task=built.task,
            stop=stop,
            parts=built.parts,
            regime=built.regime,
        )


def run_section(cfg, run_dir, fp: str, overrides, choices, lease_content: dict, resume: bool) -> dict:
    """``summary.json``'s ``run`` section as a run starts: who it is, where, by which process, from which commit."""
    return {
        "seed": cfg.seed,
        "study": cfg.get("study"),
        "overrides": list(overrides or []),
        "choices": dict(choices or {}),
        "fingerprint": fp,
        "git_sha": git_sha(),
        "name": Path(run_dir).name,
        "dir": str(Path(run_dir).resolve()),
        "host": lease_content["host"],
        "pid": lease_content["pid"],
        "started_at": now_iso(),
        "resumed": resume,
        "stopped_by": None,  # a signal's name, or why a stop was requested, when the run ends interrupted
    }


def note_takeover(record: RunRecord, holder: dict, new_attempt: bool) -> None:
    """Say in ``previous_attempts`` whose stale lease this run took over, and why.

    ``new_attempt``: ``prepare`` already added the attempt (the folder recorded an unfinished run); else the
    holder died before it recorded anything, and gets an attempt of its own.
    """
    attempts = record.summary.setdefault("previous_attempts", [])
    if not new_attempt:
        attempts.append({"status": record.summary.get("status"), "error": None, "ended_at": None})
    attempts[-1]["taken_over"] = {k: holder.get(k) for k in ("host", "pid", "job_id", "started_at", "heartbeat", "why")}


def resume_world(summary: dict, size: int) -> None:
    """Say so when a run resumes on another number of devices: it trains the same steps on the same global batch,
    but each rank sums its slice's gradients in another order, so its numbers differ in the last digits."""
    recorded = (summary.get("env") or {}).get("world_size") or 1
    if recorded != size:
        log.warning(
            "resuming on %d device(s), not the %d this run started on: the same steps on the same batches, but its "
            "numbers will differ in the last digits from an uninterrupted run (resume with trainer.devices=%d to "
            "continue bit for bit)",
            size,
            recorded,
            recorded,
        )


def resume_threads(summary: dict, configured: int | None, share: int | None) -> int | None:
    """The torch threads a resumed run continues with: those it started with, unless ``trainer.threads`` says otherwise.

    Deterministic CPU kernels still sum in an order that depends on the thread count, so a run resumed on
    another count ends a few last digits away from an uninterrupted one.
    """
    recorded = (summary.get("env") or {}).get("threads")
    if not recorded:
        return share
    if configured is not None:
        if configured != recorded:
            log.warning(
                "trainer.threads=%d differs from the %d threads this run started with: its numbers will differ in "
                "the last digits from an uninterrupted run (leave trainer.threads unset to resume with %d)",
                configured,
                recorded,
                recorded,
            )
        return share
    if share is not None and share != recorded:
        log.info("resuming with the %d threads this run started with (this job's share is %d)", recorded, share)
    return recorded


def run_resources(resources: dict, attempts: list[dict]) -> dict:
    """The run's resources over all its attempts: energy and images summed, energy per image from the sums.

    The one place ``energy_j_per_img`` is computed (a run of one attempt too).

    ``attempt`` keeps this attempt's own share. An attempt killed before it recorded anything (SIGKILL, OOM)
    has no numbers: its energy is not counted.
    """
    earlier = [a.get("resources") or {} for a in attempts]
    total = dict(resources)
    if any(any(isinstance(e.get(k), (int, float)) for k in ADDITIVE) for e in earlier):
        total["attempt"] = {k: resources.get(k) for k in ADDITIVE}
    for key in ADDITIVE:
        values = [v for v in [resources.get(key), *(e.get(key) for e in earlier)] if isinstance(v, (int, float))]
        total[key] = sum(values) if values and resources.get(key) is not None else resources.get(key)
    energy, images = total.get("energy_j"), total.get("images")
    total["energy_j_per_img"] = energy / images if energy is not None and images else None
    return total


def train_job(cfg: DictConfig, job: Job) -> dict:
    """One Hydra job of training (single or in a sweep), for :func:`~stackwise_bench.runs.job.run_job`.

    With ``trainer.devices`` > 1 (or under torchrun/Slurm tasks) the job is one run on several ranks
    (:mod:`stackwise_bench.training.ranks`): this process is rank 0 and writes the record, or a rank > 0 that
    follows the run folder rank 0 names.
    """
    args = dict(overrides=job.overrides, choices=job.choices, auto_resume=job.sweeping, device=job.device)
    if int(cfg.trainer.get("devices", 1) or 1) == 1 and not ranks_launched():
        return run(cfg, job.run_dir, threads=job.threads, **args)
    from stackwise_bench.training import ranks
    from stackwise_bench.training.precision import resolve_device

    kind = resolve_device(cfg.trainer.get("device", "auto")).type
    check_config(cfg)  # every knob, and the devices' own rules, before any rank starts
    world = ranks.plan(cfg.trainer, kind)
    if world is None:
        return run(cfg, job.run_dir, threads=job.threads, **args)
    threads = ranks.rank_threads(world, job.threads)
    with ranks.started(world, kind, follow, (cfg, job.run_dir)) as started:
        run_dir = Path(job.run_dir).resolve()
        if world.launcher != "self":  # torchrun or Slurm started every rank, each with its own Hydra: rank 0's folder
            run_dir = Path(started.group.broadcast(str(run_dir)))
        if not started.group.leads:  # a rank torchrun or Slurm started: rank 0 writes, this one follows
            if run_dir != Path(job.run_dir).resolve():
                output_dir.discard(job.run_dir)  # the folder this rank's own Hydra made (a ${now:} name)
            follow(started.group, cfg, run_dir)
            return {}
        return run(cfg, run_dir, threads=threads, ranks=started, **args)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    """The Hydra app: one training job; returns its test top-1 (what Hydra's sweepers read)."""
    return run_job(cfg, train_job)


if __name__ == "__main__":
    # Run the importable copy, so launchers pickle `stackwise_bench.train.main` by reference
    # and worker processes import this module (and its resolvers) normally.
    from stackwise_bench.train import main as entry

    entry()
