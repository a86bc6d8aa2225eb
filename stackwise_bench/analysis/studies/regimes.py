"""Depth as time against classical training: FLOPs to a target accuracy, and the test at equal compute.

The metric is the runs' task's on the test set (``test.top1`` for image classification; ``test.mse`` for a
regression task), read in the direction the task records: below, "reaches" means ≥ for a higher-is-better
metric and ≤ for a lower-is-better one, whose target is the reference's ``2 − TARGET_FRACTION`` (101%).

A *regime study* varies the ``regime`` config group (``classical``, ``classical_matched``, ``depth_time``,
``depth_time_prepend``, ``depth_time_interleave``) or, for runs without that choice, records different
``train.regime``; any other study gets ``None`` here and nothing in the report. Arms are the regimes within each
stratum (the cells of the other grouping keys, e.g. one per model); every number below is per stratum.

- Target: :data:`TARGET_FRACTION` of the mean final test top-1 of the classical full-budget arm
  (``regime=classical``), or of the best arm's where there is none.
- FLOPs to target, per run: the cumulative training FLOPs (``metrics.jsonl`` ``flops``) at the end of the first
  epoch whose *validation* top-1 reaches the target (validation accuracy is what a run sees while it trains; the
  test set is looked at once, at the end); the same in wall time (cumulative ``epoch_time_s``). NaN when the run
  never reaches it: such runs are counted (``n_never``), not averaged.
- Ratio to the classical arm, per seed: :func:`~stackwise_bench.analysis.stats.seeds.ratio_interval` (runs that
  never reached the target are left out of it).
- Equal compute: each depth-time arm against ``regime=classical_matched`` on test top-1 with
  :func:`~stackwise_bench.analysis.stats.compare.compare_cells` (paired t over shared seeds, Welch otherwise), the
  p-values Holm-adjusted over the depth-time arms.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from stackwise_bench.analysis.read.collect import finished
from stackwise_bench.analysis.read.directions import (
    MAX,
    MIN,
    SPOKEN,
    diff_unit,
    lower_is_better,
    metric_name,
    task_metrics,
)
from stackwise_bench.analysis.read.grouping import format_value, group_label, iter_groups, same_value
from stackwise_bench.analysis.stats.compare import ALPHA, compare_cells
from stackwise_bench.analysis.stats.seeds import holm, ratio_interval
from stackwise_bench.analysis.stats.verdicts import BETTER, NO_TEST, WORSE, mde_text, p_text, verdict_kind
from stackwise_bench.runs.contract import UnreadableSummary, read_summary

REGIME, TRAIN_REGIME = "regime", "train.regime"
CLASSICAL, MATCHED, DEPTH_TIME = "classical", "classical_matched", "depth_time"
TARGET_FRACTION = 0.99
NAN = float("nan")
# The equal-compute columns of regimes.csv: each depth-time arm against the classical_matched arm ({m}: top1, mse).
VS_MATCHED = (
    "vs_matched_{m}",
    "vs_matched_diff",
    "vs_matched_test",
    "vs_matched_p",
    "vs_matched_p_holm",
    "vs_matched_significant",
)


@dataclass
class RegimeAnalysis:
    """One regime study: ``table`` per arm (regimes.csv), ``runs`` per finished run, the growths' FLOPs."""

    key: str  # the column naming the arms: regime, or train.regime for runs without the choice
    fraction: float
    table: pd.DataFrame
    runs: pd.DataFrame  # run_dir, arm, regime, seed, test.top1, flops, flops_to_target, time_to_target_s, ...
    growth: pd.DataFrame  # run_dir, arm, growth (1, 2, ...), step, flops
    targets: dict[str, float] = field(default_factory=dict)  # stratum label -> target val top-1
    sentences: list[str] = field(default_factory=list)  # one per depth-time arm vs the matched classical arm
    notes: list[str] = field(default_factory=list)
    metric: str = "test.top1"  # the test metric compared; its validation curve (val_top1) decides the target
    lower: bool = False  # the metric is lower-is-better (the runs' task record says so)
    checkpoint: str = ""  # which checkpoint the runs were tested with (test.checkpoint_policy), as a sentence
    given_target: bool = False  # the target is the user's (analyze target=...), not a share of the classical arm's

    @property
    def name(self) -> str:
        """The metric's name in its task (``top1``): regimes.csv's ``top1_mean``, ``vs_matched_top1``, ..."""
        return metric_name(self.metric)


def regime_key(runs: pd.DataFrame) -> str | None:
    """``regime`` when the finished runs vary it, else ``train.regime`` when that differs, else None."""
    done = finished(runs)
    for key in (REGIME, TRAIN_REGIME):
        if key in done and done[key].dropna().astype(str).nunique() > 1:
            return key
    return None


def analyze_regimes(
    runs: pd.DataFrame,
    epochs: pd.DataFrame,
    group_by: list[str],
    fraction: float = TARGET_FRACTION,
    target: float | None = None,
) -> RegimeAnalysis | None:
    """The regime study of ``runs`` (None when they are not one); ``epochs`` from ``collect_epochs``.

    ``target``: the validation value to reach (``analyze target=3.0``: a loss every arm can reach within its
    budget), instead of ``fraction`` of the classical arm's final test value."""
    key = regime_key(runs)
    if key is None:
        return None
    others = [k for k in group_by if k not in (REGIME, TRAIN_REGIME)]
    metric = f"test.{task_metrics(runs)[0]}"
    done = finished(runs).copy()
    if metric not in done:
        done[metric] = np.nan
    done["arm"] = [group_label(r, [*others, key]) for _, r in done.iterrows()]
    curves = {d: c.sort_values("epoch") for d, c in epochs.groupby("run_dir")} if len(epochs) else {}
    a = RegimeAnalysis(key, fraction, pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), notes=_notes(done, key))
    a.given_target = target is not None
    a.metric, a.lower = metric, lower_is_better(runs, metric)
    a.checkpoint = checkpoint_sentence(done)
    share = 2 - fraction if a.lower else fraction  # within 1% of the reference, on the worse side
    rows, per_run, growth, tests = [], [], [], []
    for values, stratum in iter_groups(done, others):
        label = group_label(values, others)
        where = f"{label}: " if others else ""
        cells = {v[key]: c for v, c in iter_groups(stratum, [key])}
        means = {v: pd.to_numeric(c.get(metric), errors="coerce").mean() for v, c in cells.items()}
        means = {v: m for v, m in means.items() if np.isfinite(m)}
        ref = next((v for v in cells if same_value(v, CLASSICAL)), None)
        best = (min if a.lower else max)(means, key=means.get, default=None)
        goal = target if target is not None else float(share * means.get(ref if ref is not None else best, NAN))
        a.targets[label] = goal
        if not np.isfinite(goal):
            a.notes.append(f"{where}No finished run recorded {metric}: there is no target to reach.")
        elif ref is None and target is None:
            a.notes.append(
                f"{where}No classical full-budget arm (regime={CLASSICAL}): the target is {share:.0%} of the "
                f"best arm's ({format_value(best)}) mean {label_of(metric)}, and no FLOPs ratio is computed."
            )
        mine = pd.DataFrame([_run_row(r, curves.get(r["run_dir"]), goal, key, a) for _, r in stratum.iterrows()])
        per_run.append(mine)
        growth += [g for _, r in stratum.iterrows() for g in _growths(r, curves.get(r["run_dir"]), key)]
        of = {v: mine[mine["run_dir"].isin(c["run_dir"])] for v, c in cells.items()}
        matched = next((c for v, c in cells.items() if same_value(v, MATCHED)), None)
        for value, cell in cells.items():
            kind = _kind(value, cell.get(TRAIN_REGIME))
            stats = _arm_stats(of[value], of[ref] if ref is not None else None, a)
            rows.append({**values, "arm": cell["arm"].iloc[0], REGIME: value, "kind": kind, **stats, "target": goal})
            if kind == DEPTH_TIME and matched is not None:
                name = format_value(value) + (f" ({label})" if others else "")
                tests.append((len(rows) - 1, name, compare_cells(cell, matched, metric, lower=a.lower)))
        if matched is None and any(_kind(v, c.get(TRAIN_REGIME)) == DEPTH_TIME for v, c in cells.items()):
            a.notes.append(
                f"{where}No {MATCHED} arm, so the depth-time arms are not tested against classical training at "
                "equal FLOPs."
            )
    a.table, a.runs = pd.DataFrame(rows), pd.concat(per_run, ignore_index=True)
    a.growth = pd.DataFrame(growth, columns=["run_dir", "arm", "growth", "step", "flops"])
    a.sentences = _tests(a.table, tests, a)
    if not a.runs["reached"].any() and np.isfinite(list(a.targets.values())).any():
        a.notes.append(f"No run's {label_of(a.metric, 'val')} reached its target, so no FLOPs to target can be given.")
    return a


def _run_row(r: pd.Series, curve: pd.DataFrame | None, target: float, key: str, a: RegimeAnalysis) -> dict:
    """One run: its total FLOPs (``train.flops``, else the last epoch's) and the FLOPs / time to ``target``."""
    flops, time_s, val = _col(curve, "flops"), _col(curve, "epoch_time_s"), _col(curve, f"val_{a.name}")
    hit = np.flatnonzero(val <= target if a.lower else val >= target)
    total = pd.to_numeric(pd.Series([r.get("train.flops")]), errors="coerce").iloc[0]
    logged = flops[np.isfinite(flops)]
    return {
        "run_dir": r["run_dir"],
        "arm": r["arm"],
        REGIME: r[key],
        "seed": r["seed"],
        a.metric: r.get(a.metric, NAN),
        "flops": total if np.isfinite(total) else (logged[-1] if len(logged) else NAN),
        "time_s": pd.to_numeric(pd.Series([r.get("train.time_s")]), errors="coerce").iloc[0],
        "reached": bool(len(hit)),
        "target_epoch": int(curve["epoch"].iloc[hit[0]]) if len(hit) else None,
        "flops_to_target": flops[hit[0]] if len(hit) else NAN,
        "time_to_target_s": time_s[: hit[0] + 1].sum() if len(hit) else NAN,
    }


def _growths(r: pd.Series, curve: pd.DataFrame | None, key: str) -> list[dict]:
    """A depth-time run's growths (``train.growth_steps`` in summary.json) at FLOPs interpolated linearly
    between its epochs' (``step``, ``flops``) points, starting from (0, 0): exact at an epoch's end, a little
    high within the epoch of a growth (its steps before the growth cost less than those after)."""
    if _kind(r[key], pd.Series([r.get(TRAIN_REGIME)])) != DEPTH_TIME:
        return []
    try:
        steps = ((read_summary(r["run_dir"]) or {}).get("train") or {}).get("growth_steps") or []
    except UnreadableSummary:
        return []
    s, f = _col(curve, "step"), _col(curve, "flops")
    ok = np.isfinite(s) & np.isfinite(f)
    at = np.interp(steps, np.r_[0.0, s[ok]], np.r_[0.0, f[ok]], right=NAN) if ok.any() else [NAN] * len(steps)
    return [
        {"run_dir": r["run_dir"], "arm": r["arm"], "growth": i + 1, "step": st, "flops": float(fl)}
        for i, (st, fl) in enumerate(zip(steps, at))
    ]


def _arm_stats(mine: pd.DataFrame, ref: pd.DataFrame | None, a: RegimeAnalysis) -> dict:
    values = pd.to_numeric(mine[a.metric], errors="coerce").dropna()
    flops = pd.to_numeric(mine["flops"], errors="coerce").mean()
    ratio = ratio_interval(_by_seed(mine), _by_seed(ref)) if ref is not None else (NAN, NAN, NAN, 0)
    return {
        "n": len(values),
        f"{a.name}_mean": values.mean(),
        f"{a.name}_std": values.std(ddof=1) if len(values) > 1 else NAN,
        "flops_mean": flops,
        "flops_vs_classical": flops / pd.to_numeric(ref["flops"], errors="coerce").mean() if ref is not None else NAN,
        "time_s_mean": mine["time_s"].mean(),
        "flops_to_target_mean": mine["flops_to_target"].mean(),
        "time_to_target_s_mean": mine["time_to_target_s"].mean(),
        "n_reached": int(mine["reached"].sum()),
        "n_never": int((~mine["reached"]).sum()),
        "ftt_ratio": ratio[0],
        "ftt_ratio_ci95_low": ratio[1],
        "ftt_ratio_ci95_high": ratio[2],
        "ftt_ratio_pairs": ratio[3],
    }


def _tests(table: pd.DataFrame, tests: list[tuple[int, str, dict]], a: RegimeAnalysis) -> list[str]:
    """Fill the equal-compute columns of ``table`` (Holm over the depth-time arms); one sentence per arm."""
    names = [c.format(m=a.name) for c in VS_MATCHED]
    cols = {c: [""] * len(table) if c == "vs_matched_test" else [NAN] * len(table) for c in names}
    adjusted = holm([t.get("p_value", NAN) for _, _, t in tests])
    out = []
    for (i, name, t), p_holm in zip(tests, adjusted):
        values = (t["mean_baseline"], t.get("diff", NAN), t.get("test", ""), t.get("p_value", NAN), p_holm)
        for col, v in zip(names, (*values, p_holm < ALPHA if np.isfinite(p_holm) else NAN)):
            cols[col][i] = v
        out.append(_sentence(name, t, p_holm, a))
    for col, values in cols.items():
        table[col] = values
    table["vs_matched_significant"] = table["vs_matched_significant"].astype("boolean")
    return out


def _sentence(name: str, t: dict, p_holm: float, a: RegimeAnalysis) -> str:
    """``depth_time: 97.10 vs 96.40 for classical at equal FLOPs, +0.70 points: no difference detected (p = 0.070,
    Holm 0.120, paired t; with n = 3 paired seeds the smallest effect this test would detect at 80% power is 4.1
    points).`` It beat (or did worse than) classical only where the test is significant and the interval of the
    difference lies on that side of zero (:mod:`~stackwise_bench.analysis.stats.verdicts`)."""
    diff = t.get("diff", NAN)
    head = f"{name}: {t['mean']:.2f} vs {t['mean_baseline']:.2f} for classical at equal FLOPs, {diff:+.2f} "
    head += diff_unit(a.metric)
    row = {**t, "p_holm": p_holm, "metric": a.metric}
    kind = verdict_kind(row, MIN if a.lower else MAX)
    if kind == NO_TEST:
        why = t.get("note") or "too few seeds"
        return f"{head}; no test ({why}): whether it beat classical at equal FLOPs cannot be said."
    if kind == BETTER:
        return f"{head}: it beat classical at equal FLOPs ({p_text(row)})."
    if kind == WORSE:
        return f"{head}: it did worse than classical at equal FLOPs ({p_text(row)})."
    mde = mde_text(row)
    return f"{head}: no difference detected ({p_text(row)}{'; ' + mde if mde else ''})."


POLICY = "test.checkpoint_policy"


def checkpoint_sentence(done: pd.DataFrame) -> str:
    """``Tested checkpoint (test.checkpoint_policy): best validation epoch at the final depth, in all 12 runs.``;
    the policies with their counts where runs differ; what is known where the records do not say."""
    policies = done[POLICY].dropna().astype(str) if POLICY in done else pd.Series(dtype=str)
    missing = len(done) - len(policies)
    if policies.empty:
        return (
            "Tested checkpoint: not recorded (no test.checkpoint_policy: records from before it). These runs were "
            "tested with their best.pt, which in a depth-time run may be an epoch before its last growth, a "
            "shallower network than the one it trained to: see the warnings on mixed architectures."
        )
    counts = policies.value_counts()
    if len(counts) == 1 and not missing:
        n = int(counts.iloc[0])
        every = f"all {n} runs" if n > 2 else "both runs" if n == 2 else "the one run"
        return f"Tested checkpoint ({POLICY}): {counts.index[0]}, in {every}."
    parts = [f"{policy} in {n} run{'s' if n != 1 else ''}" for policy, n in counts.items()]
    if missing:
        parts.append(f"not recorded in {missing} run{'s' if missing != 1 else ''}")
    return f"Tested checkpoint ({POLICY}) differs between runs: " + "; ".join(parts) + "."


def _notes(done: pd.DataFrame, key: str) -> list[str]:
    notes = []
    if key == TRAIN_REGIME:
        notes.append(
            "These runs have no regime choice, so arms are told apart by train.regime (classical or "
            "depth_time) and a matched classical arm cannot be told from the full one."
        )
    counted = pd.to_numeric(done.get("train.flops", pd.Series(NAN, done.index)), errors="coerce").notna()
    if not counted.any():
        notes.append(
            "No run recorded training FLOPs (runs from before compute accounting, or FLOPs that could not "
            "be counted): the FLOP columns are empty; the accuracy comparison and wall times still stand."
        )
    elif not counted.all():
        notes.append(
            f"{int((~counted).sum())} of {len(done)} finished runs recorded no training FLOPs: they are "
            "missing from the FLOP columns."
        )
    return notes


def label_of(metric: str, split: str = "test") -> str:
    """``test top-1`` / ``validation top-1`` for image classification's accuracy, else ``test.mse`` / ``val_mse``."""
    name = metric_name(metric)
    if name in SPOKEN:
        return f"{'validation' if split == 'val' else 'test'} {SPOKEN[name]}"
    return metric if split == "test" else f"val_{name}"


def _kind(value, recorded: pd.Series | None) -> str:
    """``classical`` or ``depth_time``: what the runs recorded (``train.regime``), else read off the arm's name."""
    recorded = recorded.dropna() if recorded is not None else ()
    if len(recorded):
        return str(recorded.mode().iloc[0])
    return DEPTH_TIME if str(value).startswith(DEPTH_TIME) else CLASSICAL


def _by_seed(runs: pd.DataFrame) -> pd.Series:
    return runs.dropna(subset=["seed"]).groupby("seed")["flops_to_target"].mean()


def _col(curve: pd.DataFrame | None, name: str) -> np.ndarray:
    if curve is None or name not in curve:
        return np.full(0 if curve is None else len(curve), NAN)
    return pd.to_numeric(curve[name], errors="coerce").to_numpy(dtype=float)
