"""``python -m stackwise_bench.evaluate checkpoint=<run folder or .pt> [quantize=fp8_e4m3] [key=value ...]``.

The command line of :func:`stackwise_bench.evaluation.evaluate_checkpoint`: re-evaluate a
run's checkpoint on its own test split, optionally with FP8 or int8/int4 weights, into ``<run>/eval/<name>/``.
A language-model run reports test loss, perplexity and bits per byte; ``generate=true prompt="ROMEO:"`` adds
seeded samples, ``export=DIR`` writes the tested weights as a ``save_pretrained`` folder
(``model.checkpoint_path=DIR`` starts a new run from it); ``zero_shot.task=lambada zero_shot.path=FILE`` scores a
zero-shot task (lambada, hellaswag, piqa; PIQA's labels file: ``zero_shot.labels=``) into ``eval/best_<task>``.
``prompt=`` is taken verbatim (everything after its first ``=``), never parsed: ``prompt=ROMEO:`` stays text.
Keys and defaults: ``conf/evaluate.yaml``. Not a Hydra app on purpose: Hydra's override
grammar rejects the ``=`` in sweep job folders (``multirun/AugmFP16/seed=42``);
``OmegaConf.from_dotlist`` splits each argument at its first ``=``, as ``analyze`` does.
Exit status: 0 done, 2 bad input (one sentence on stderr).

``python -m stackwise_bench.evaluate --multirun experiment=FP8Test`` is an evaluation study
instead: a Hydra app (:func:`study_main`, ``conf/evaluate_study.yaml``) whose jobs each
evaluate every finished run of another study (:func:`~stackwise_bench.evaluation.evaluate_study`),
with the same launch record, job folders and failure table as a training sweep.
"""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path

import hydra

from stackwise_bench.cli import parse_key_values
from stackwise_bench.configs import CONF_DIR
from stackwise_bench.errors import ConfigError
from stackwise_bench.evaluation import evaluate_checkpoint, evaluate_study
from stackwise_bench.knobs import check_evaluate_config, check_evaluate_study_config
from stackwise_bench.runs.folders import shown_path
from stackwise_bench.runs.job import run_job  # also registers the ${sb.n_jobs:} resolver the launcher config uses

CONF = Path(CONF_DIR) / "evaluate.yaml"
USAGE = (
    "usage: python -m stackwise_bench.evaluate checkpoint=<run folder>|<file.pt> "
    "[quantize=fp8_e4m3|fp8_e5m2|int8|int4] [group_size=32] [keep_head=true] [activations=false] "
    "[name=<folder>] [device=cpu|cuda] [dataset.root=<dir>] "
    "[generate=true prompt=<text> max_new_tokens=200 temperature=0.8 top_k=200 seed=1337 samples=1] [export=<new dir>] "
    "[zero_shot.task=lambada|hellaswag|piqa zero_shot.path=<jsonl> [zero_shot.labels=<piqa .lst>]]"
)


def parse_args(argv: list[str]) -> dict:
    """``key=value`` arguments over the defaults in ``conf/evaluate.yaml``; ConfigError for an unknown key."""
    from omegaconf import OmegaConf

    defaults = OmegaConf.to_container(OmegaConf.load(CONF))
    # prompt= is text, verbatim: OmegaConf's dotlist would read prompt=ROMEO: as a mapping, prompt=1999 as a number
    prompts = [a.split("=", 1)[1] for a in argv if a.split("=", 1)[0] == "prompt"]
    given = parse_key_values([a for a in argv if a.split("=", 1)[0] != "prompt"], defaults, USAGE)
    if prompts:
        given["prompt"] = prompts[-1]
    args = {**defaults, **given}
    for group in ("dataset", "zero_shot"):
        args[group] = {**defaults[group], **given.get(group, {})}
    if not args["checkpoint"]:
        raise ConfigError(f"checkpoint= is missing: name a run folder or a .pt file inside one; {USAGE}")
    check_evaluate_config(args)  # every value's type and range, before any run is read
    return args


def study_job(cfg, job) -> dict:
    """One job of an evaluation study, for :func:`~stackwise_bench.runs.job.run_job`."""
    from omegaconf import OmegaConf

    check_evaluate_study_config(cfg)  # every knob's type and range, before any run is read
    return evaluate_study(
        **OmegaConf.to_container(cfg.evaluate, resolve=True),
        out_dir=job.run_dir,
        threads=job.threads,
        device=job.device,
    )


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate_study")
def study_main(cfg) -> float | None:
    """The Hydra app of evaluation studies (``--multirun experiment=FP8Test``); config ``conf/evaluate_study.yaml``."""
    return run_job(cfg, study_job)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("--multirun", "-m") for a in argv):
        sys.argv = [sys.argv[0], *argv]  # Hydra reads sys.argv itself
        study_main()
        return 0
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
    print(shown_path(summary["run"]["dir"]))
    return 0


if __name__ == "__main__":
    # Run the importable copy, so launchers pickle `stackwise_bench.evaluate.study_main` by reference.
    from stackwise_bench.evaluate import main as entry

    sys.exit(entry())
