"""One run on several devices (``trainer.devices=2``): gloo on this CPU, the real entrypoint in subprocesses.

2 ranks at batch B/2 must train what 1 process trains at batch B (DDP and FSDP2, a ViT and gpt_micro): every
metric row and the final weights agree to 1e-5. Rank 0 is the one writer; a SIGTERM stops the group once and the
resume equals an uninterrupted 2-rank run bit for bit; kill -9 of a rank ends the group within seconds and says
which rank; the launchers (joblib, submitit_local's tasks, torchrun) run it unchanged; bad input is refused
before any rank starts.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import ROOT, read_metrics, read_summary, wait_for

pytestmark = pytest.mark.slow

VIT = ["model=vit_micro_p4", "trainer.max_epochs=2", "monitors=none", "trainer.progress=log"]
GPT = [
    "model=gpt_micro",
    "dataset=shakespeare",
    "trainer.max_epochs=3",
    "dataset.steps_per_epoch=4",
    "trainer.batch_size=4",
    "dataset.seq_len=16",
    "dataset.val_tokens=512",
    "dataset.test_tokens=1024",
    "monitors=none",
    "trainer.progress=log",
]
GROWN = [*VIT, "regime=depth_time", "trainer.max_epochs=4"]
# resnet8 with its BatchNorm synchronised over the ranks (training/sync_norm.py), on 16 SGD steps. Contiguous
# layout: torch's float32 channels_last BatchNorm backward on the CPU is itself 5% off float64 on the stem's
# gradient here (the synchronised one sums in float64), and a convnet's tiny differences grow step by step.
RESNET = [
    "model=resnet8",
    *("dataset=synthetic", "dataset.num_train=256", "dataset.num_test=64", "trainer.batch_size=32"),
    *("trainer.max_epochs=2", "trainer.channels_last=false", "optimizer=sgd", "optimizer.lr=0.01"),
    *("monitors=none", "trainer.progress=log"),
]
ACCUMULATED = [*VIT, "trainer.accumulate=2"]
# BERT fine-tuned on a generated SST-2-layout task (a dict batch: ids, segments, mask, labels), dropout off
GLUE = ["model=bert_micro", "model.dropout=0.0", "dataset=glue", "dataset.task=sst2", "trainer.max_epochs=2"]
GLUE += ["trainer.batch_size=16", "monitors=none", "trainer.progress=log"]
# max |difference| of the metrics and of the final weights (ResNet: BatchNorm's float32 rounding, see above)
TOLERANCE = {"resnet": (1e-4, 1e-3)}
COMPARED = ("step", "flops", "train_loss", "train_top1", "val_loss", "val_top1", "val_ppl", "val_bpb", "val_acc", "lr")
# Long enough to be caught after a few epochs on a busy machine, short enough to finish twice.
LONG = [*VIT, "trainer.max_epochs=24", "trainer.early_stopping_patience=null"]


def train(args: list[str], cwd: Path, *, wait: bool = True, module: list[str] | None = None):
    """``python -m stackwise_bench.train <args>`` (or ``module``'s command) in a session of its own."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    command = module or [sys.executable, "-m", "stackwise_bench.train"]
    proc = subprocess.Popen(
        [*command, *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


def rows(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []


def max_delta(a: Path, b: Path) -> float:
    """The largest |difference| of the compared metrics over two runs' metrics.jsonl, row by row."""
    ra, rb = read_metrics(a), read_metrics(b)
    assert [r["epoch"] for r in ra] == [r["epoch"] for r in rb]
    deltas = [abs(x[k] - y[k]) for x, y in zip(ra, rb, strict=True) for k in COMPARED if x.get(k) is not None]
    return max(deltas)


def weights_delta(a: Path, b: Path) -> float:
    """The largest |difference| of two runs' final weights, but for a ViT's attention key bias: softmax is blind to
    it, so its gradient is 0 in exact arithmetic and pure rounding noise in floats, which AdamW normalises into
    steps of size lr (measured: 2e-4 on it after 40 steps; every other weight within 1e-7)."""
    wa = torch.load(a / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["model"]
    wb = torch.load(b / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["model"]
    assert wa.keys() == wb.keys()
    deltas = []
    for key in [k for k in wa if wa[k].is_floating_point()]:
        d = (wa[key].double() - wb[key].double()).abs()
        if key.endswith("attn.qkv.bias"):
            n = len(d) // 3
            d = torch.cat([d[:n], d[2 * n :]])  # q and v biases; k's is the noise above
        deltas.append(float(d.max()))
    return max(deltas)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The 1-process runs the ranks are compared with (one thread, like each rank)."""
    base = tmp_path_factory.mktemp("one")
    cache = f"dataset.cache_dir={base / 'cache'}"
    made = subprocess.run(
        [sys.executable, "-m", "stackwise_bench.data.text.glue_synthetic", str(base / "glue"), "200", "64"]
    )
    assert made.returncode == 0
    glue = [*GLUE, f"dataset.root={base / 'glue'}"]
    for name, args in (("vit", VIT), ("gpt", [*GPT, cache]), ("grown", GROWN), ("resnet", RESNET), ("glue", glue)):
        code, out = train([*args, "trainer.threads=1", f"hydra.run.dir={base / name}"], base)
        assert code == 0, out[-3000:]
    return base


@pytest.mark.parametrize(
    ("model", "strategy"),
    [
        *(("vit", "ddp"), ("vit", "fsdp"), ("gpt", "ddp"), ("gpt", "fsdp")),
        *(("grown", "ddp"), ("resnet", "ddp"), ("accumulated", "ddp"), ("accumulated", "fsdp"), ("glue", "ddp")),
    ],
)
def test_two_ranks_train_what_one_process_trains(one_process, tmp_path, model, strategy):
    """``grown``: depth-as-time under DDP, whose wrapper is built again after the growth; ``accumulated``:
    micro-batches on each rank (DDP syncs after the last); ``resnet``: BatchNorm over the whole batch (with
    per-rank statistics the losses miss by 4e-3, the weights by 2e-2)."""
    cache = f"dataset.cache_dir={one_process / 'cache'}"
    glue = [*GLUE, f"dataset.root={one_process / 'glue'}"]
    args = {
        "vit": VIT,
        "grown": GROWN,
        "gpt": [*GPT, cache],
        "resnet": RESNET,
        "accumulated": ACCUMULATED,
        "glue": glue,
    }
    args = args[model]
    model = "vit" if model == "accumulated" else model  # 2 ranks x 2 micro-batches of 16 train as 1 x 64
    metrics_tol, weights_tol = TOLERANCE.get(model, (1e-5, 1e-5))
    run_dir = tmp_path / "run"
    code, out = train(
        [*args, "trainer.devices=2", f"trainer.strategy={strategy}", f"hydra.run.dir={run_dir}"], tmp_path
    )
    assert code == 0, out[-3000:]
    summary, single = read_summary(run_dir), read_summary(one_process / model)
    assert summary["status"] == "completed"
    assert {k: summary["env"][k] for k in ("world_size", "backend", "strategy")} == {
        "world_size": 2,
        "backend": "gloo",
        "strategy": strategy,
    }
    assert max_delta(run_dir, one_process / model) < metrics_tol
    assert weights_delta(run_dir, one_process / model) < weights_tol
    steps = [
        [json.loads(line)["loss"] for line in (d / "steps.jsonl").read_text().splitlines()]
        for d in (run_dir, one_process / model)
    ]
    assert len(steps[0]) == len(steps[1]) and max(abs(a - b) for a, b in zip(*steps)) < metrics_tol  # the batch's loss
    metric = summary["task"]["metric"]
    assert summary["test"][metric] == pytest.approx(single["test"][metric], abs=metrics_tol)
    assert summary["train"]["flops"] == single["train"]["flops"]  # every rank's samples are counted once
    # one writer: no folder, lease or file of another rank's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert not list(run_dir.glob("**/*rank*"))


def test_evaluate_reads_an_fsdp_checkpoint_on_one_device(tmp_path):
    run_dir = tmp_path / "run"
    code, out = train([*VIT, "trainer.devices=2", "trainer.strategy=fsdp", f"hydra.run.dir={run_dir}"], tmp_path)
    assert code == 0, out[-3000:]
    code, out = train([f"checkpoint={run_dir}"], tmp_path, module=[sys.executable, "-m", "stackwise_bench.evaluate"])
    assert code == 0, out[-3000:]
    (record,) = [json.loads(p.read_text()) for p in run_dir.glob("eval/*/summary.json")]
    assert record["test"]["top1"] == pytest.approx(read_summary(run_dir)["test"]["top1"], abs=1e-9)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    base = tmp_path_factory.mktemp("whole")
    code, out = train([*LONG, "trainer.devices=2", f"hydra.run.dir={base / 'run'}"], base)
    assert code == 0, out[-3000:]
    return base / "run"


def test_sigterm_stops_the_group_once_and_the_resume_is_bit_identical(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    proc = train([*LONG, "trainer.devices=2", f"hydra.run.dir={run_dir}"], tmp_path, wait=False)
    wait_for(lambda: len(rows(run_dir)) >= 2 or proc.poll() is not None, "two epochs")
    os.kill(proc.pid, signal.SIGTERM)  # rank 0 only: the others hear it through the group
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    summary = read_summary(run_dir)
    assert summary["status"] == "interrupted" and summary["run"]["stopped_by"] == "SIGTERM"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    code, out = train([*LONG, "trainer.devices=2", f"hydra.run.dir={run_dir}", "trainer.resume=true"], tmp_path)
    assert code == 0, out[-3000:]
    assert read_summary(run_dir)["status"] == "completed"
    assert max_delta(run_dir, uninterrupted) == 0.0
    assert weights_delta(run_dir, uninterrupted) == 0.0


@pytest.mark.parametrize("again", [["trainer.devices=2", "trainer.strategy=fsdp"], ["trainer.devices=1"]])
def test_an_fsdp_run_resumes_on_as_many_or_fewer_devices(uninterrupted, tmp_path, again):
    """FSDP's checkpoint is the single-process format: it resumes under FSDP (the optimizer's state re-keyed by
    name) and on one device, which says that the last digits will differ."""
    run_dir = tmp_path / "run"
    proc = train(
        [*LONG, "trainer.devices=2", "trainer.strategy=fsdp", f"hydra.run.dir={run_dir}"], tmp_path, wait=False
    )
    wait_for(lambda: len(rows(run_dir)) >= 2 or proc.poll() is not None, "two epochs")
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert read_summary(run_dir)["status"] == "interrupted", out[-3000:]
    code, out = train([*LONG, *again, f"hydra.run.dir={run_dir}", "trainer.resume=true"], tmp_path)
    assert code == 0, out[-3000:]
    assert ("not the 2 this run started on" in out) == (again == ["trainer.devices=1"])
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["env"]["world_size"] == int(again[0][-1])
    assert max_delta(run_dir, uninterrupted) < 1e-5


def test_kill_9_of_rank_1_ends_the_group_and_a_relaunch_finishes(tmp_path):
    run_dir = tmp_path / "run"
    proc = train([*LONG, "trainer.devices=2", f"hydra.run.dir={run_dir}"], tmp_path, wait=False)
    wait_for(lambda: len(rows(run_dir)) >= 2 or proc.poll() is not None, "two epochs")
    ranks = [p for p in psutil.Process(proc.pid).children() if "resource_tracker" not in " ".join(p.cmdline())]
    assert len(ranks) == 1, [p.cmdline() for p in ranks]
    ranks[0].kill()
    killed = time.monotonic()
    out, _ = proc.communicate(timeout=60)
    assert time.monotonic() - killed < 30
    assert proc.returncode != 0
    assert not ranks[0].is_running()
    summary = read_summary(run_dir)
    assert summary["status"] == "failed"
    assert "rank 1 was killed by SIGKILL" in summary["error"]["message"]
    code, out = train([*LONG, "trainer.devices=2", f"hydra.run.dir={run_dir}", "trainer.resume=true"], tmp_path)
    assert code == 0, out[-3000:]
    assert [r["epoch"] for r in read_metrics(run_dir)] == list(range(1, 25))
    assert read_summary(run_dir)["previous_attempts"][0]["status"] == "failed"


def test_the_weight_average_trains_on_every_rank(tmp_path):
    run_dir = tmp_path / "run"
    code, out = train([*VIT, "trainer.devices=2", "trainer.ema=0.5", f"hydra.run.dir={run_dir}"], tmp_path)
    assert code == 0, out[-3000:]  # the weight average runs on every rank and the run completes
    assert "val_top1_ema" in read_metrics(run_dir)[-1]


def test_joblib_and_submitit_tasks_run_two_ranks(tmp_path):
    code, out = train(
        ["--multirun", *VIT, "trainer.devices=2", "seed=1,2", f"hydra.sweep.dir={tmp_path / 'joblib'}"], tmp_path
    )
    assert code == 0, out[-3000:]
    for seed in (1, 2):
        summary = read_summary(tmp_path / "joblib" / f"seed={seed}")
        assert summary["status"] == "completed" and summary["env"]["world_size"] == 2
    args = ["--multirun", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", *VIT]
    code, out = train([*args, f"hydra.sweep.dir={tmp_path / 'tasks'}"], tmp_path)
    assert code == 0, out[-3000:]
    (job,) = [d for d in (tmp_path / "tasks").iterdir() if (d / "summary.json").exists()]
    summary = read_summary(job)
    assert summary["status"] == "completed" and summary["env"]["world_size"] == 2
    assert summary["env"]["strategy"] == "ddp"


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_torchrun_ranks_share_rank_0s_folder(tmp_path):
    """Each torchrun rank runs Hydra and makes a ${now:} folder: only rank 0's is left, and it holds the run."""
    torchrun = [shutil.which("torchrun"), "--standalone", "--nproc_per_node=2", "-m", "stackwise_bench.train"]
    code, out = train(VIT, tmp_path, module=torchrun)
    assert code == 0, out[-3000:]
    folders = [p.parent for p in tmp_path.glob("multirun/single-runs/*/*/summary.json")]
    assert len(folders) == 1 and read_summary(folders[0])["env"]["world_size"] == 2
    assert len(list(tmp_path.glob("multirun/single-runs/*/*"))) == 1


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["trainer.devices=4096", "trainer.batch_size=4096"], "trainer.devices=4096 is more than the"),
        (["trainer.devices=2", "trainer.strategy=fsdp", "model=resnet8"], "has no block list to wrap"),
        (["trainer.devices=2", "trainer.batch_size=63"], "does not divide into trainer.devices=2"),
        (["trainer.devices=2", "trainer.strategy=fsdp", "regime=depth_time"], "FSDP's sharded blocks cannot"),
        (["trainer.devices=2", "trainer.strategy=zero"], "trainer.strategy"),
    ],
)
def test_bad_input_is_refused_before_any_rank_starts(tmp_path, args, says):
    run_dir = tmp_path / "run"
    code, out = train([*VIT, *args, f"hydra.run.dir={run_dir}"], tmp_path)
    assert code == 2, out[-3000:]
    errors = [line for line in out.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and says in errors[0], out[-3000:]
    assert not run_dir.exists()
    assert "Traceback" not in out


def _synced_norm_rank(rank: int, port: int, out: str) -> None:
    """One rank of :func:`test_synced_batchnorm_is_the_whole_batchs`: its slice's output, input gradient, stats."""
    import torch.distributed as dist

    from stackwise_bench.training.sync_norm import GlooSyncBatchNorm

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    x, weights, norm = _norm_case(GlooSyncBatchNorm)
    part = torch.tensor_split(x, 2)[rank].clone().requires_grad_()
    y = norm(part)
    (y * torch.tensor_split(weights, 2)[rank]).sum().backward()
    torch.save({"y": y.detach(), "grad": part.grad, "mean": norm.running_mean, "var": norm.running_var}, f"{out}{rank}")
    dist.destroy_process_group()


def _norm_case(cls):
    torch.manual_seed(0)
    x = torch.randn(10, 3, 4, 4) * 3 + 1
    norm = cls(3)
    norm.weight.data.uniform_()
    norm.bias.data.uniform_()
    return x, torch.linspace(-1, 1, x.numel()).view_as(x), norm


def test_synced_batchnorm_is_the_whole_batchs(tmp_path):
    """2 ranks of 5 samples give what BatchNorm2d gives on the 10: outputs, the inputs' gradients (through the
    all-reduce's backward), running mean and unbiased variance."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_synced_norm_rank, args=(port, str(tmp_path / "r")), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"r{r}") for r in range(2)]
    x, weights, norm = _norm_case(torch.nn.BatchNorm2d)
    x.requires_grad_()
    y = norm(x)
    (y * weights).sum().backward()
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.cat([r["grad"] for r in ranks]), x.grad, atol=1e-6, rtol=0)
    for r in ranks:
        torch.testing.assert_close(r["mean"], norm.running_mean, atol=1e-6, rtol=0)
        torch.testing.assert_close(r["var"], norm.running_var, atol=1e-6, rtol=0)
