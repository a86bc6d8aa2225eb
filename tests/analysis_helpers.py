"""Hand-built run folders for the analysis tests, written through the run record's own writer.

``write_run`` writes summary.json, metrics.jsonl, hardware.jsonl and split.json through
:class:`~stackwise_bench.runs.record.RunRecord` (so the fixtures cannot drift from what a
real run writes), plus Hydra's .hydra/ files, with exactly the numbers a test passes in,
so every statistic the tests check can be recomputed independently from those numbers.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import yaml

from stackwise_bench.runs.contract import read_summary
from stackwise_bench.runs.provenance import fingerprint
from stackwise_bench.runs.record import RunRecord

CHOICES = {
    "model": "resnet8",
    "dataset": "digits",
    "precision": "fp32",
    "augmentation": "basic",
    "optimizer": "adamw",
    "scheduler": "cosine",
    "lora": "default",
    "trainer": "default",
    "monitors": "default",
    "experiment": None,
}
CONFIG = {
    "seed": 0,
    "precision": {"name": "fp32"},
    "model": {"name": "resnet8", "pretrained": False},
    "dataset": {"name": "digits", "num_classes": 10, "root": "data"},
    "optimizer": {"name": "adamw", "lr": 0.001, "weight_decay": 0.05},
    "scheduler": {"name": "cosine", "warmup_epochs": 1},
    "lora": {"rank": 0, "alpha": None, "dropout": 0.1},
    "trainer": {"max_epochs": 3, "batch_size": 64},
    "monitors": {
        "hardware": {"_target_": "stackwise_bench.training.monitors.HardwareMonitor", "interval_s": 1.0, "gpu": True}
    },
}


def set_dotted(tree: dict, dotted: str, value) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def delete_dotted(tree: dict, dotted: str) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node[p]
    del node[leaf]


def _apply_deletion(item: str, choices: dict, config: dict) -> None:
    """``~key`` (a single run) or ``~key=null`` (a sweep job), as Hydra records them: the key leaves the config.

    Deleting a config group (``~monitors``) also drops its choice, as Hydra's ``runtime.choices`` does.
    """
    key = item[1:].split("=", 1)[0]
    if key in choices:
        del choices[key]
    delete_dotted(config, key)


def _typed(text: str):
    """Hydra types override values: 1e-3 is a float (PyYAML alone would keep it a string)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def curve(n_epochs: int = 3, val=None, train=None, epoch_time=None, lr=None) -> list[dict]:
    """Per-epoch rows; ``val``/``train``/``epoch_time``/``lr`` are lists of n_epochs numbers."""
    val = val or [50.0 + 10 * i for i in range(n_epochs)]
    train = train or [v + 5 for v in val]
    epoch_time = epoch_time or [2.0] * n_epochs
    lr = lr or [0.001 * (n_epochs - i) / n_epochs for i in range(n_epochs)]
    return [
        {
            "epoch": i + 1,
            "step": 10 * (i + 1),
            "lr": lr[i],
            "train_loss": 2.0 / (i + 1),
            "train_top1": train[i],
            "val_loss": 2.2 / (i + 1),
            "val_top1": val[i],
            "epoch_time_s": epoch_time[i],
            "train_img_s": 1000.0 / epoch_time[i],
        }
        for i in range(len(val))
    ]


def write_run(
    root: Path,
    job: str,
    *,
    seed: int,
    overrides: list[str] | None = None,
    choices: dict | None = None,
    status: str = "completed",
    test: dict | None = None,
    train: dict | None = None,
    params: dict | None = None,
    resources: dict | None = None,
    epochs: list[dict] | None = None,
    hardware: list[dict] | None = None,
    error: dict | None = None,
    n_classes: int = 3,
    config_values: dict | None = None,
    task: dict | None = None,
) -> Path:
    """One run folder ``root/job`` with the given numbers; returns its path.

    ``overrides`` are Hydra override strings; group overrides (``precision=fp16``)
    set the choice, dotted ones (``lora.rank=8``) set the config value, deletions
    (``~monitors.hardware=null``, as a sweep job records them) remove the key.
    ``config_values`` (dotted key -> value) change the config without an override,
    as a config group or an experiment preset does. ``task``: the record's ``task`` section (its metrics and
    their directions); without it the record is an image classifier's, whose test metrics are filled in.
    """
    run_dir = Path(root) / job
    (run_dir / ".hydra").mkdir(parents=True)
    choices = {**CHOICES, **(choices or {})}
    overrides = [f"seed={seed}", *(overrides or [])]
    config = copy.deepcopy(CONFIG)
    config["seed"] = seed
    for item in overrides:
        if item.startswith("~"):
            _apply_deletion(item, choices, config)
            continue
        key, value = item.split("=", 1)
        if key in choices:
            choices[key] = value
        else:
            set_dotted(config, key, _typed(value))
    for key, value in (config_values or {}).items():
        set_dotted(config, key, value)
    config["precision"]["name"] = choices["precision"]
    record = RunRecord(run_dir)
    record.start(
        run={
            "seed": seed,
            "overrides": overrides,
            "choices": choices,
            # like the real one, a hash of what is trained (volatile keys left out; two studies' same runs share it)
            "fingerprint": hashlib.sha256(
                json.dumps([fingerprint(config), choices], sort_keys=True).encode()
            ).hexdigest(),
            "git_sha": "abc123",
            "name": job,
            "dir": str(run_dir),
            "started_at": "2024-01-01T00:00:00+00:00",
        },
        config=config,
        env={
            "torch": "2.4.0",
            "device": "cpu",
            "python": "3.11.7",
            "platform": "linux",
            "cpu_count": 2,
            "threads": 2,
            "gpu_name": None,
            "hostname": "test",
        },
    )
    record.write_split({})
    for row in epochs or []:
        record.log_epoch(row)
    for row in hardware or []:
        record.log_hardware(row)
    sections = {"params": params, "train": train, "resources": resources, "task": task}
    if test is not None and task is not None:
        sections["test"] = test
    elif test is not None:
        cm = [[10 if i == j else 1 for j in range(n_classes)] for i in range(n_classes)]
        sections["test"] = {
            "top5": 100.0,
            "f1_macro": test.get("top1", 0) - 1,
            "precision_macro": 90.0,
            "recall_macro": 90.0,
            "loss": 0.3,
            "per_class_top1": [90.0] * n_classes,
            "confusion_matrix": cm,
            "infer_img_s": 5000.0,
            **test,
        }
    sections = {k: v for k, v in sections.items() if v is not None}
    if status == "running":
        record.update(**sections)
    else:
        record.finish(status, error=error, **sections)
        _set_ended_at(record, "2024-01-01T00:10:00+00:00")
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / ".hydra" / "hydra.yaml").write_text(
        yaml.safe_dump({"hydra": {"runtime": {"choices": {**choices, "hydra/launcher": "basic"}}}})
    )
    return run_dir


def _set_ended_at(record: RunRecord, when: str) -> None:
    """Fixed timestamps, so tests can state the order of records (the writer stamps the wall clock)."""
    record.summary["run"]["ended_at"] = when
    record.write_summary()


def finished_run(
    root: Path,
    job: str,
    *,
    seed: int,
    top1: float,
    overrides: list[str] | None = None,
    choices: dict | None = None,
    time_s: float = 60.0,
    trainable: int = 1000,
    img_s: float = 1000.0,
    epochs: list[dict] | None = None,
    **kw,
) -> Path:
    """A completed run with a given test.top1 and the train/params/resources sections filled in."""
    epochs = epochs if epochs is not None else curve()
    evaluated = [r for r in epochs if r["val_top1"] is not None]
    best = max(evaluated, key=lambda r: r["val_top1"]) if evaluated else {"val_top1": top1, "epoch": 1}
    train = {
        "best_val_top1": best["val_top1"],
        "best_epoch": best["epoch"],
        "epochs_run": len(epochs),
        "time_s": time_s,
        "img_s": img_s,
        "epoch_time_mean_s": 2.0,
        "epoch_time_std_s": 0.0,
        "final_train_top1": epochs[-1]["train_top1"] if epochs else 90.0,
        "final_train_loss": 0.1,
        "final_val_top1": epochs[-1]["val_top1"] if epochs else top1,
        "final_val_loss": 0.3,
        "stopped_early": False,
    }
    params = {"total": 100000, "trainable": trainable, "lora": 0, "size_mb": 0.4}
    resources = {"peak_rss_mb": 500.0, "peak_gpu_mem_mb": None, "cpu_percent_mean": 180.0, "rss_mb_mean": 450.0}
    return write_run(
        root,
        job,
        seed=seed,
        overrides=overrides,
        choices=choices,
        test={"top1": top1},
        train=train,
        params=params,
        resources=resources,
        epochs=epochs,
        **kw,
    )


def write_eval(
    run_dir: Path,
    name: str,
    *,
    quantize: str | None,
    after: float | None = None,
    before: float | None = None,
    weight_bytes: tuple[int, int] = (400_000, 112_000),
    status: str = "completed",
    keep_head: bool = True,
    activations: bool = False,
    checkpoint: str = "best.pt",
    ended_at: str = "2024-01-02T00:00:00+00:00",
) -> Path:
    """One evaluation record ``run_dir/eval/name`` shaped like ``evaluate_checkpoint``'s summary.json.

    ``before`` (the unquantized re-evaluation) defaults to the run's recorded test top-1; ``after`` is
    the top-1 after quantization (ignored without ``quantize``).
    """
    source = read_summary(run_dir)
    recorded = source["test"]["top1"] if checkpoint == "best.pt" else None
    before = recorded if before is None else before
    eval_dir = Path(run_dir) / "eval" / name
    assert not eval_dir.exists()
    n = len(source["test"]["per_class_top1"])
    summary = {
        "kind": "evaluate",
        "run": {
            "name": name,
            "dir": str(eval_dir),
            "fingerprint": f"ev{name}",
            "command": None,
            "started_at": ended_at,
            "device": "cpu",
            "precision": source["config"]["precision"]["name"],
            "seed": source["run"]["seed"],
            "choices": source["run"]["choices"],
            "checkpoint": checkpoint,
            "quantize": quantize,
            "keep_head": keep_head,
            "activations": activations,
        },
        "source": {
            "dir": str(run_dir),
            "checkpoint": str(Path(run_dir) / "checkpoints" / checkpoint),
            "checkpoint_sha256": "0" * 64,
            "checkpoint_epoch": 3,
            "status": source["status"],
            "recorded_test_top1": recorded,
            "run": source["run"],
        },
        "config": source["config"],
        "classes": [str(i) for i in range(n)],
    }
    record = RunRecord(eval_dir)
    record.start(**summary)
    summary = {}
    if status == "failed":
        summary["error"] = {
            "type": "RuntimeError",
            "message": "out of memory",
            "reason": "RuntimeError",
            "traceback": "Traceback ...",
        }
    elif status == "completed":
        base = _eval_metrics(before, n) | {"matches_recorded": None if recorded is None else before == recorded}
        if quantize is None:
            summary["test"] = base
        else:
            test = _eval_metrics(after, n)
            per_class = [round(b - a, 4) for b, a in zip(base["per_class_top1"], test["per_class_top1"])]
            summary.update(
                baseline=base,
                test=test,
                quantize={
                    "format": quantize,
                    "keep_head": keep_head,
                    "layers": ["conv1", "fc"],
                    "num_layers": 2,
                    "activations": "dynamic_per_tensor" if activations else None,
                    "weight_bytes_before": weight_bytes[0],
                    "weight_bytes_after": weight_bytes[1],
                    "compression": weight_bytes[0] / weight_bytes[1],
                    "weight_rel_error": 0.02,
                },
                degradation={
                    "top1_points": before - after,
                    "top5_points": 0.0,
                    "f1_macro_points": before - after,
                    "loss_increase": 0.01,
                    "per_class_top1_points": per_class,
                    "worst_class": max(range(n), key=per_class.__getitem__),
                    "worst_class_points": max(per_class),
                    "classes_worse": sum(p > 0 for p in per_class),
                    "classes_better": sum(p < 0 for p in per_class),
                },
            )
    if status == "running":
        record.update(**summary)
    else:
        record.finish(status, **summary)
        _set_ended_at(record, ended_at)
    return eval_dir


def _eval_metrics(top1: float, n_classes: int) -> dict:
    """Test metrics of one pass: every class at the overall accuracy except the first, 1 point lower."""
    per_class = [top1 - (1.0 if i == 0 else 0.0) for i in range(n_classes)]
    return {
        "top1": top1,
        "top5": 100.0,
        "f1_macro": top1,
        "loss": 0.3,
        "per_class_top1": per_class,
        "confusion_matrix": [[1] * n_classes for _ in range(n_classes)],
    }
