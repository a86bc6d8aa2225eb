"""The nanoGPT figure: nanoGPT's own ``train.py`` and ``python -m stackwise_bench.train`` side by side, on one token
file, one model shape and one recipe, arms interleaved (seed by seed, the order alternating).

The anchor (issue 26) is nanoGPT's CPU "baby GPT": 4 layers, 4 heads, width 128, context 64, batch 12, dropout 0,
AdamW (0.9, 0.99) at 1e-3 with weight decay 0.1 on every 2-D tensor, clip 1.0, warmup then cosine to lr/10.
Here both sides train it on the byte ids of the Shakespeare plays (``dataset=shakespeare dataset.tokenizer=byte``):

- **One token file.** The project's token cache already writes nanoGPT's format (flat uint16 ``train.bin`` /
  ``val.bin``), so nanoGPT's ``data/<dataset>/`` holds links to the cache entry's files and a ``meta.pkl`` with
  ``vocab_size=256``: both read the very same bytes (the rows record each side's resolved path and the sha256).
- **One clock and one judge** (:mod:`.lm_arm`): each run is timed from the outside by torch's optimizer-step hook;
  a step is the interval between two updates (data fetch included), the first 5 steps and every interval holding
  an evaluation are left out, and the median is taken. The validation loss at step ``N`` is scored by one function
  for both models: mean nats over every target of the whole validation split (exact contiguous windows).
- **The recipe** is nanoGPT's, expressed in project knobs (:func:`project_argv`); what cannot be made equal is
  listed in :data:`DIFFERENCES` and goes into both rows.

Rows: tokens/s of the project ÷ nanoGPT (the median over seeds of the per-seed ratio, goal >= 1.0), and the
validation loss at equal steps: the mean of each side over seeds, the difference with a Welch 95% interval, and
whether that interval holds 0 ("within seed noise").

Runtime on 2 shared CPU cores with ``--threads 1`` (2026-12-08): full (2,000 steps x 3 seeds a side) 13.4 min,
``--quick`` (200 x 2) 2.4 min; ~52 ms a step either side, plus ~10 s of start-up and ~15 s of judging a run.
Each run lasts minutes, so on a machine others load, two intra-op threads meet their neighbours' bursts: with
2 threads and a load average of 4-5 on 2 cores, a project run slowed from 37 to 740 ms a step between two
evaluations. ``--threads 1`` gives both sides one thread each and keeps the per-seed ratio steady.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch

import stackwise_bench
from stackwise_bench.bench.harness import BUDGETS, Budget, compare, interleaved

NANOGPT_DIR = Path(__file__).parent / "nanogpt"  # karpathy/nanoGPT at 3adf61e, unchanged (MIT, LICENSE beside)
DATASET = "stackwise_shakespeare_byte"  # nanoGPT's data/<dataset>/ folder
# nanoGPT's CPU recipe (README, "baby GPT" on a laptop, with config/train_shakespeare_char.py's optimizer)
SHAPE = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "batch_size": 12}
LR, MIN_LR, BETA2, WEIGHT_DECAY, GRAD_CLIP = 1e-3, 1e-4, 0.99, 0.1, 1.0
SKIP_STEPS = 5  # the first steps are not timed (allocator growth, first-call dispatch; compilation on a GPU)
JUDGE_BATCH = 64  # windows per forward pass of the judge (any size gives the same total nats)

DIFFERENCES = (
    "AdamW kernel: the project's optimizer.implementation=auto is the fused one; nanoGPT's on CPU is the "
    "for-loop one (neither fused nor foreach): same update, different speed",
    "warmup: nanoGPT lr*(it+1)/(W+1), the project lr*(step+1)/W; the cosine to lr/10 over the same steps is equal",
    "nanoGPT does max_iters+1 updates; both are scored after N (nanoGPT's evaluation at iter N precedes its last)",
    "random streams: nanoGPT draws init and windows from torch's global generator seeded 1337+seed, the project "
    "from seed (init) and a generator of its own (windows): same distributions, different draws",
    "each side's own validation estimate differs (nanoGPT: eval_iters random batches; the project: the first "
    "dataset.val_tokens ids exactly): both are reported, but the compared loss is the one judge's",
    "the project runs with its defaults otherwise (monitors, diagnostics=basic every 50 steps, steps.jsonl every "
    "20, a checkpoint per evaluation, trainer.deterministic=true): the median step hides the periodic ones",
    "models: transformers' GPT2LMHeadModel (Conv1D, SDPA) with model.nanogpt=true vs nanoGPT's GPT (Linear, SDPA) "
    "with bias=True: same parameters, init, exact GELU, eps 1e-5, tied embeddings",
)


@dataclasses.dataclass(frozen=True)
class LMSize:
    """How much of the figure to run."""

    steps: int  # updates compared (nanoGPT's max_iters and lr_decay_iters)
    seeds: tuple  # one interleaved repetition per seed, each side once
    eval_interval: int  # nanoGPT's eval_interval = the project's dataset.steps_per_epoch
    warmup: int  # nanoGPT's warmup_iters (the project: scheduler.warmup_epochs = warmup / eval_interval)
    eval_iters: int  # nanoGPT's own estimate (random batches per split); the compared loss is the judge's
    judge_tokens: int | None = None  # the judge's validation ids: None = the whole split
    project_extra: tuple = ()  # more project overrides (tests shrink its own evaluation)


SIZES = {
    "full": LMSize(steps=2000, seeds=(1, 2, 3), eval_interval=250, warmup=100, eval_iters=20),
    "quick": LMSize(steps=200, seeds=(1, 2), eval_interval=100, warmup=10, eval_iters=20),
}


def size_of(b: Budget) -> LMSize:
    return SIZES["quick" if b == BUDGETS["quick"] else "full"]


def device_setup() -> dict:
    """CPU: float32, no compile (nanoGPT's laptop recipe). GPU: both compiled, bfloat16 autocast."""
    if torch.cuda.is_available():
        return {"device": "cuda", "nanogpt": ["--compile=True", "--dtype=bfloat16"], "project": ["precision=bf16"]}
    return {"device": "cpu", "nanogpt": ["--compile=False", "--dtype=float32"], "project": []}


def nanogpt_argv(s: LMSize, setup: dict, out_dir: str) -> list[str]:
    """``train.py``'s ``--key=value`` overrides: the CPU recipe on the shared token file."""
    shape = [f"--{k}={v}" for k, v in SHAPE.items()]
    return [
        f"--dataset={DATASET}",
        f"--out_dir={out_dir}",
        *shape,
        "--dropout=0.0",
        "--bias=True",  # GPT-2's setting (transformers' GPT-2 has biases)
        "--gradient_accumulation_steps=1",
        f"--learning_rate={LR}",
        f"--min_lr={MIN_LR}",
        f"--beta2={BETA2}",
        f"--weight_decay={WEIGHT_DECAY}",
        f"--grad_clip={GRAD_CLIP}",
        f"--max_iters={s.steps}",
        f"--lr_decay_iters={s.steps}",
        f"--warmup_iters={s.warmup}",
        f"--eval_interval={s.eval_interval}",
        f"--eval_iters={s.eval_iters}",
        "--log_interval=10",
        "--always_save_checkpoint=False",
        f"--device={setup['device']}",
        *setup["nanogpt"],
    ]


def project_argv(s: LMSize, setup: dict, cache_dir: Path, run_dir: Path, seed: int) -> list[str]:
    """The same recipe in project knobs (its defaults otherwise)."""
    return [
        "model=gpt_micro",
        "dataset=shakespeare",
        "dataset.tokenizer=byte",
        "model.nanogpt=true",  # exact GELU, dropout 0, eps 1e-5, init 0.02 with scaled residual projections
        f"model.n_layer={SHAPE['n_layer']}",
        f"model.n_head={SHAPE['n_head']}",
        f"model.n_embd={SHAPE['n_embd']}",
        f"model.context={SHAPE['block_size']}",
        f"dataset.seq_len={SHAPE['block_size']}",
        f"trainer.batch_size={SHAPE['batch_size']}",
        f"dataset.steps_per_epoch={s.eval_interval}",
        f"trainer.max_epochs={s.steps // s.eval_interval}",
        "trainer.early_stopping_patience=null",
        f"trainer.grad_clip={GRAD_CLIP}",
        f"optimizer.lr={LR}",
        f"optimizer.weight_decay={WEIGHT_DECAY}",  # every 2-D tensor: the position embeddings' name is decayed too
        f"optimizer.betas=[0.9,{BETA2}]",
        f"scheduler.warmup_epochs={s.warmup / s.eval_interval}",
        f"scheduler.min_lr_ratio={MIN_LR / LR}",
        "dataset.test_tokens=4096",  # the test pass comes after training and is not compared: keep it short
        f"dataset.cache_dir={cache_dir}",
        f"trainer.device={setup['device']}",
        f"trainer.compile={str(setup['device'] == 'cuda').lower()}",
        f"seed={seed}",
        "trainer.progress=log",
        f"hydra.run.dir={run_dir}",
        *setup["project"],
        *s.project_extra,
    ]


def token_files(cache_dir: Path | None) -> dict:
    """The project's byte ids of the plays (built once in the token cache): the entry's train.bin and val.bin."""
    from stackwise_bench.data.text.dataset import load_text_dataset

    data = load_text_dataset("shakespeare", "byte", cache_dir=None if cache_dir is None else str(cache_dir))
    entry = data.tokens.path
    if data.tokens.manifest["dtype"] != "uint16":
        raise RuntimeError(f"the token cache {entry} holds {data.tokens.manifest['dtype']} ids; nanoGPT reads uint16")
    return {
        "cache_dir": data.cache_dir,
        "entry": entry,
        "vocab_size": data.vocab_size,
        **{f"{split}_sha256": sha256(entry / f"{split}.bin") for split in ("train", "val")},
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def nanogpt_folder(work: Path, files: dict) -> Path:
    """nanoGPT's working folder: ``configurator.py`` and ``data/<DATASET>/`` linking the project's cache files."""
    folder = work / "nanogpt"
    data = folder / "data" / DATASET
    data.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        link = data / f"{split}.bin"
        if not link.exists():
            link.symlink_to(files["entry"] / f"{split}.bin")
    (data / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": files["vocab_size"]}))
    shutil.copy(NANOGPT_DIR / "configurator.py", folder / "configurator.py")  # train.py exec()s it from the cwd
    return folder


def run_arm(spec: dict, cwd: Path, log: Path) -> dict:
    """One arm in a process of its own (:mod:`.lm_arm`); its result with the process's stdout."""
    spec_path = Path(spec["result"]).with_suffix(".spec.json")
    spec_path.write_text(json.dumps(spec))
    package_root = str(Path(stackwise_bench.__file__).resolve().parents[1])  # a clone or site-packages: any cwd
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "stackwise_bench.bench.lm_arm", str(spec_path)]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=7200)
    log.write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"the {spec['side']} arm (seed {spec['seed']}) failed:\n{done.stderr[-2000:]}")
    return {**json.loads(Path(spec["result"]).read_text()), "stdout": done.stdout}


def step_seconds(result: dict) -> tuple[float, int]:
    """The median step and how many were timed: the first :data:`SKIP_STEPS` and evaluation intervals left out."""
    held = {done - 1 for done in result["evals_after"]}  # interval i covers update i + 2; an eval after d updates
    kept = [t for i, t in enumerate(result["intervals_s"]) if i + 2 > SKIP_STEPS and i not in held]
    if not kept:
        raise RuntimeError(f"{result['side']}: no step left to time after {SKIP_STEPS} and the evaluations")
    return statistics.median(kept), len(kept)


def own_val_loss(result: dict, run_dir: Path, steps: int) -> float | None:
    """Each side's own estimate at ``steps``: nanoGPT's printed ``val loss``, the project's ``metrics.jsonl``."""
    if result["side"] == "nanogpt":
        found = re.findall(rf"^step {steps}: train loss [\d.]+, val loss ([\d.]+)", result["stdout"], re.M)
        return float(found[0]) if found else None
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next((r["val_loss"] for r in rows if r["step"] == steps), None)


def read_paths(side: str, folder: Path) -> list[str]:
    """The token files a side read, resolved: nanoGPT's links; the project's cache entry from summary.json."""
    if side == "nanogpt":
        return [str((folder / "data" / DATASET / f"{s}.bin").resolve()) for s in ("train", "val")]
    entry = Path(json.loads((folder / "summary.json").read_text())["data"]["tokens"]["path"])
    return [str((entry / f"{s}.bin").resolve()) for s in ("train", "val")]


def welch(a: list[float], b: list[float]) -> dict:
    """mean(a) - mean(b) with a Welch 95% interval (None with fewer than 2 runs a side); ``within_noise`` only from
    3 runs a side: with 2, the t quantile (~12.7) makes almost any difference "noise", a verdict worth nothing."""
    from scipy import stats

    diff = statistics.fmean(a) - statistics.fmean(b)
    if min(len(a), len(b)) < 2:
        return {"diff": diff, "ci": None, "within_noise": None}
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return {"diff": diff, "ci": [diff, diff], "within_noise": diff == 0}
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(stats.t.ppf(0.975, df)) * se
    judged = min(len(a), len(b)) >= 3
    return {
        "diff": diff,
        "ci": [diff - half, diff + half],
        "within_noise": diff - half <= 0 <= diff + half if judged else None,
    }


def fig_nanogpt(b: Budget, work: Path, size: LMSize | None = None, cache_dir: Path | None = None) -> list[dict]:
    """tokens/s and the validation loss at equal steps: ``stackwise_bench.train`` ÷ nanoGPT's ``train.py``."""
    s, setup = size or size_of(b), device_setup()
    if s.steps % s.eval_interval or s.steps <= SKIP_STEPS + 1:
        raise ValueError(
            f"steps={s.steps} must be a multiple of eval_interval={s.eval_interval} above {SKIP_STEPS + 1}"
        )
    files = token_files(cache_dir)
    folder = nanogpt_folder(work, files)
    runs: dict[str, list[dict]] = {"stackwise": [], "nanoGPT": []}

    def spec(side: str, seed: int, argv: list[str], name: str) -> dict:
        judge = {"at_steps": [s.steps], "seq_len": SHAPE["block_size"], "batch": JUDGE_BATCH}
        judge["val_path"], judge["max_tokens"] = str(files["entry"] / "val.bin"), s.judge_tokens
        return {"side": side, "seed": seed, "argv": argv, "device": setup["device"], "judge": judge,
                "threads": torch.get_num_threads(),  # both sides alike: torch's default, or the CLI's --threads
                "script_dir": str(NANOGPT_DIR), "result": str(work / f"{name}.json")}  # fmt: skip

    def arm(side: str, rep: int) -> float:
        seed = s.seeds[rep]
        name = f"{'nanogpt' if side == 'nanoGPT' else 'project'}-{seed}"
        if side == "nanoGPT":
            out = folder / f"out-{seed}"
            result = run_arm(
                spec("nanogpt", seed, nanogpt_argv(s, setup, out.name), name), folder, work / f"{name}.log"
            )
            paths = read_paths("nanogpt", folder)
        else:
            out = work / name
            argv = project_argv(s, setup, files["cache_dir"], out, seed)
            result = run_arm(spec("project", seed, argv, name), work, work / f"{name}.log")
            paths = read_paths("project", out)
        step_s, timed = step_seconds(result)
        judged = result["judged"].get(str(s.steps))
        if judged is None:
            raise RuntimeError(f"{side} (seed {seed}) never evaluated after {s.steps} updates: no judged loss")
        runs[side].append(
            {"seed": seed, "updates": result["updates"], "step_ms": 1e3 * step_s, "timed_steps": timed,
             "val_loss": judged["loss"], "val_targets": judged["targets"], "params": judged.get("params"),
             "own_val_loss": own_val_loss(result, out, s.steps), "read": paths, "threads": result["threads"]}
        )  # fmt: skip
        return SHAPE["batch_size"] * SHAPE["block_size"] / step_s

    samples = interleaved(
        len(s.seeds), {"stackwise": lambda r: arm("stackwise", r), "nanoGPT": lambda r: arm("nanoGPT", r)}
    )
    return rows(s, setup, files, samples, runs)


def rows(s: LMSize, setup: dict, files: dict, samples: dict, runs: dict) -> list[dict]:
    """The figure's two rows (tokens/s; validation loss at equal steps) from the runs."""
    where = f"4x128, T=64, batch 12, {s.steps} steps x {len(s.seeds)} seeds, {setup['device']}" + (
        " compiled bf16" if setup["device"] == "cuda" else ""
    )
    common = {
        "figure": "nanogpt",
        "nanogpt_commit": "3adf61e",
        "token_files": {k: str(v) for k, v in files.items()},
        "runs": runs,
        "differences": list(DIFFERENCES),
    }
    speed = {
        "setting": f"tokens/s, stackwise_bench.train / nanoGPT train.py: {where}",
        "unit": "tok/s",
        "goal": ">= 1.0",
        **compare(samples, "stackwise", "nanoGPT"),
    }
    losses = {side: [r["val_loss"] for r in runs[side]] for side in runs}
    test = welch(losses["stackwise"], losses["nanoGPT"])
    sd = {side: statistics.stdev(v) if len(v) > 1 else float("nan") for side, v in losses.items()}
    ci = f"[{test['ci'][0]:+.3f}, {test['ci'][1]:+.3f}]" if test["ci"] else "[n/a]"
    verdict = {True: "yes", False: "NO", None: "n/a (fewer than 3 seeds a side)"}[test["within_noise"]]
    mean = {side: statistics.fmean(v) for side, v in losses.items()}
    loss = {
        "setting": (
            f"val loss at step {s.steps} (one judge, {runs['stackwise'][0]['val_targets']:,} val targets): "
            f"{mean['stackwise']:.3f}±{sd['stackwise']:.3f} vs {mean['nanoGPT']:.3f}±{sd['nanoGPT']:.3f}; "
            f"diff {test['diff']:+.3f} 95% CI {ci}; within seed noise: {verdict}"
        ),
        "unit": "nats",
        "goal": "",
        "a": "stackwise",
        "b": "nanoGPT",
        "a_median": statistics.median(losses["stackwise"]),
        "b_median": statistics.median(losses["nanoGPT"]),
        "ratio": mean["stackwise"] / mean["nanoGPT"],
        "ratio_min": min(losses["stackwise"]) / max(losses["nanoGPT"]),
        "ratio_max": max(losses["stackwise"]) / min(losses["nanoGPT"]),
        "samples": losses,
        "loss_sd": sd,
        "loss_diff": test["diff"],
        "loss_diff_ci95": test["ci"],
        "within_seed_noise": test["within_noise"],
    }
    return [{**common, **speed}, {**common, **loss}]
