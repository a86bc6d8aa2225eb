"""The run-record contract: file names, statuses, the keys that don't change a run, and reading summary.json.

Everything that writes or reads a run folder takes its names from here: the
writer (:mod:`stackwise_bench.runs.record`), the sweep protocol, ``evaluate`` and
the torch-free analysis. Standard library only, so the analysis can import it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from stackwise_bench.errors import ConfigError

# Bump when a summary.json key that analysis relies on changes meaning; readers refuse newer records.
SCHEMA_VERSION = 1

# ---- files of a run folder (DESIGN.md, "The run record") ---------------------------------------
SUMMARY = "summary.json"  # atomic; the single source of truth
METRICS = "metrics.jsonl"  # one line per epoch
STEPS = "steps.jsonl"  # training steps 1 and every trainer.log_every_n_steps: step, epoch, loss, lr, grad_norm
HARDWARE = "hardware.jsonl"  # monitor samples
DIAGNOSTICS = "diagnostics.jsonl"  # per-layer gradient/weight/activation statistics on logging steps
SPLIT = "split.json"  # the exact train/val indices
PREDICTIONS = "predictions.jsonl"  # the test split's predictions, one row each (GLUE runs: row, part, pred, label)
CHECKPOINTS = "checkpoints"  # last.pt, best.pt
LEASE = ".lease"  # who is writing the folder now (runs/lease.py); absent when nobody is
EVAL_DIR = "eval"  # <run>/eval/<name>/: evaluation records written by `evaluate`
EVAL_KIND = "evaluate"  # summary["kind"] of an evaluation record
# ---- files of a study folder -----------------------------------------------------------------------
SEARCH_DB = "optuna.db"  # a hyperparameter search's Optuna storage (runs/search.py writes, analysis/search.py reads)

# ---- the task a run learns (summary.json's ``task`` section) ------------------------------------------
# Image classification as the trainer records it (training/tasks.py), and the task of every record written
# before runs named theirs (the analysis reads metric directions from it: analysis/read/directions.py).
IMAGE_CLASSIFICATION = {
    "name": "image_classification",
    "unit": "img",
    "metric": "top1",
    "directions": {
        "loss": "min",
        "top1": "max",
        "top5": "max",
        "f1_macro": "max",
        "precision_macro": "max",
        "recall_macro": "max",
    },
    # The values each metric can take (None: unbounded): accuracies are percentages, the loss a
    # cross-entropy. Confidence intervals stay inside them (analysis/read/directions.py, analysis/stats/seeds.py).
    "ranges": {
        "loss": {"low": 0, "high": None},
        "top1": {"low": 0, "high": 100},
        "top5": {"low": 0, "high": 100},
        "f1_macro": {"low": 0, "high": 100},
        "precision_macro": {"low": 0, "high": 100},
        "recall_macro": {"low": 0, "high": 100},
    },
}

# Causal language modelling (training/lm_task.py): the next-token loss in nats per token is the headline, lower
# is better; perplexity is exp(loss) and bits per byte the loss over the bytes the targets encode (the only one
# comparable across tokenizers). Early stopping and best.pt take the lowest validation loss.
CAUSAL_LM = {
    "name": "causal_lm",
    "unit": "token",
    "metric": "loss",
    "directions": {"loss": "min", "ppl": "min", "bpb": "min", "word_ppl": "min"},
    "ranges": {
        "loss": {"low": 0, "high": None},
        "ppl": {"low": 1, "high": None},
        "bpb": {"low": 0, "high": None},
        "word_ppl": {"low": 1, "high": None},
    },
}

# Zero-shot tasks of a causal language model (lm_zero_shot.py; `evaluate zero_shot.task=lambada ...`): an evaluation
# record's test section holds <task>_<metric>, e.g. lambada_acc, and its task section the directions. Accuracies are
# percentages, higher is better; LAMBADA's ppl is the perplexity of the last word, lower is better. The headline of
# a multiple-choice task is acc_norm (length-normalised), as the GPT-2/GPT-3 papers and the harness report it.
ZERO_SHOT_METRICS = {
    "lambada": {"acc": "max", "ppl": "min"},
    "hellaswag": {"acc": "max", "acc_norm": "max"},
    "piqa": {"acc": "max", "acc_norm": "max"},
}
ZERO_SHOT_HEADLINE = {"lambada": "acc", "hellaswag": "acc_norm", "piqa": "acc_norm"}


def zero_shot_task(task: str) -> dict:
    """The ``task`` section of a zero-shot evaluation record of ``task`` (a key of :data:`ZERO_SHOT_METRICS`)."""
    metrics = ZERO_SHOT_METRICS[task]
    ranges = {"max": {"low": 0, "high": 100}, "min": {"low": 1, "high": None}}  # percentages; a perplexity
    return {
        "name": f"zero_shot_{task}",
        "unit": "example",
        "metric": f"{task}_{ZERO_SHOT_HEADLINE[task]}",
        "directions": {f"{task}_{m}": d for m, d in metrics.items()},
        "ranges": {f"{task}_{m}": ranges[d] for m, d in metrics.items()},
    }


# Masked language modelling (BERT pretraining, training/mlm_task.py): the cross-entropy per masked token is the
# headline, lower is better; ``acc`` is the share of masked tokens predicted exactly (percent), ``ppl`` exp(loss).
MASKED_LM = {
    "name": "masked_lm",
    "unit": "token",
    "metric": "loss",
    "directions": {"loss": "min", "ppl": "min", "acc": "max"},
    "ranges": {"loss": {"low": 0, "high": None}, "ppl": {"low": 1, "high": None}, "acc": {"low": 0, "high": 100}},
}

# GLUE fine-tuning (training/glue_task.py, training/glue_metrics.py): every metric is GLUE's x 100 and higher is
# better but the loss (cross-entropy, or STS-B's mean squared error). The headline is the task's first metric
# (CoLA mcc, MRPC/QQP f1, STS-B pearson, the others acc), recorded per run as ``task.metric``; ``score`` is the
# mean of the task's metrics (GLUE's per-task number), which a study over several tasks averages.
_PERCENT, _CORRELATION = {"low": 0, "high": 100}, {"low": -100, "high": 100}
GLUE = {
    "name": "glue",
    "unit": "seq",
    "directions": {
        "loss": "min", "acc": "max", "f1": "max", "mcc": "max", "pearson": "max", "spearman": "max", "score": "max",
        "acc_matched": "max", "acc_mismatched": "max",
    },
    "ranges": {
        "loss": {"low": 0, "high": None}, "acc": _PERCENT, "f1": _PERCENT, "mcc": _CORRELATION,
        "pearson": _CORRELATION, "spearman": _CORRELATION, "score": _CORRELATION,
        "acc_matched": _PERCENT, "acc_mismatched": _PERCENT,
    },
}  # fmt: skip

# ---- statuses ------------------------------------------------------------------------------------
STATUSES = ("running", "completed", "early_stopped", "failed", "interrupted")
# A run that trained to its end: its metrics and best.pt are final.
FINISHED = ("completed", "early_stopped")

# ---- keys that do not change what is trained -------------------------------------------------------
# The one list: the config fingerprint ignores them, a resumed or relaunched run may change them, the
# analysis never splits cells by them, and Hydra's override_dirname.exclude_keys (conf/config.yaml) is
# this list plus FOLDER_ONLY_KEYS (tests/test_contract.py proves the YAML agrees). A key covers its
# children: "monitors" also covers monitors.hardware.interval_s.
VOLATILE_KEYS = (
    "trainer.resume",
    "trainer.progress",
    "trainer.log_every_n_steps",
    "trainer.threads",  # placement, like the sweep's share of cores; a resume keeps the count it started with
    "monitors",
    "diagnostics",  # reads gradients, weights and activations; never changes them (tests/test_diagnostics.py)
    "logger",  # trackers are sinks of the record's dicts
    "study",
    "plan",
    "lease",
)
# Where a run computes, not what: the fingerprint ignores them, so a run resumes on another number of devices (its
# last digits then differ, as after a change of trainer.threads), but a sweep over them names its job folders
# by them and the analysis shows them (the world size each run trained on).
PLACEMENT_KEYS = ("trainer.devices", "trainer.strategy")
# Left out of job folder names only: a preset's name restates its values (which the fingerprint sees),
# a search preset (hparams_search) sets Hydra's sweeper, and the number of parallel jobs is the launcher's business.
FOLDER_ONLY_KEYS = ("experiment", "hparams_search", "hydra.launcher.n_jobs")
# Where data or weights live, not what they are: never a cell of the analysis by default.
PLACE_KEYS = ("dataset.root", "dataset.download", "model.checkpoint_path")


# Keys added after runs were recorded, at the value with which they train as the code before them did: a config at
# that value has the fingerprint it had before the key existed (a sweep launched then is not "changed", a run
# recorded then resumes), and a record without the key compares equal to it.
NEUTRAL = {"trainer.accumulate": 1, "model.nanogpt": False, "dataset.plays": "all", "dataset.train_tokens": None}


def is_volatile(key: str) -> bool:
    """Whether the dotted config ``key`` is, or sits under, one of :data:`VOLATILE_KEYS`."""
    return any(key == v or key.startswith(v + ".") for v in VOLATILE_KEYS)


class UnreadableSummary(ConfigError):
    """A summary.json that exists but cannot be read: damaged, or not a JSON object."""


class NewerRecord(ConfigError):
    """A summary.json written by a newer stackwise_bench (a higher ``schema_version``) than this one reads."""


def read_summary(run_dir: str | os.PathLike) -> dict | None:
    """The parsed ``summary.json`` of a run (or evaluation) folder.

    Returns:
        The summary dict, or None when the folder has no summary.json (nothing was recorded there).

    Raises:
        UnreadableSummary: the file is not valid JSON or not a JSON object. Writes are atomic, so a crash
            cannot cause either; callers that list many runs (the analysis) report the folder and go on.
        NewerRecord: it was written with a newer ``schema_version`` than :data:`SCHEMA_VERSION`: nothing
            here may read or overwrite it.
    """
    path = Path(run_dir) / SUMMARY
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UnreadableSummary(
            f"{path} cannot be read ({exc.strerror}); fix its permissions or remove the folder."
        ) from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise UnreadableSummary(
            f"{path} is not valid JSON ({exc}); it was edited or damaged outside stackwise_bench: "
            "restore it or move the folder aside."
        ) from exc
    if not isinstance(data, dict):
        raise UnreadableSummary(f"{path} holds a JSON {type(data).__name__}, not a run summary; move the folder aside.")
    version = data.get("schema_version", 1)
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise NewerRecord(
            f"{path} has schema_version {version}, newer than the {SCHEMA_VERSION} this stackwise_bench reads; "
            "upgrade stackwise_bench (pip install -U stackwise_bench) to read it."
        )
    return data
