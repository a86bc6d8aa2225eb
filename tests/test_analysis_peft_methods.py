"""The PEFT study across adapter methods (lora.method × lora.rank): table, frontier, highlights, Pareto figure.

The study is hand-built with known numbers (3 methods × 2 ranks × 3 seeds, plus full fine-tuning recorded
under two methods at rank 0, and plain-LoRA runs recorded before lora.method existed); every expected value
below is recomputed from those numbers, not read back from the analysis.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest

from stackwise_bench.analysis import analyze_runs, write_report
from stackwise_bench.analysis.plots.peft import peft_pareto
from stackwise_bench.analysis.studies.peft import peft_study as peft_view
from stackwise_bench.runs.contract import SUMMARY

from analysis_helpers import finished_run

SEEDS = (1, 2, 3)
METHODS = ("lora", "dora", "qalora")
RANKS = (4, 16)
HEAD = 500  # the fully trained head, counted in trainable but not in the adapter
FULL_PARAMS = 1_000_000
ADAPTER = {("lora", 4): 4_000, ("lora", 16): 16_000, ("dora", 4): 4_200, ("dora", 16): 16_200}
ADAPTER |= {("qalora", 4): 3_000, ("qalora", 16): 12_000}
# test.top1 per cell and seed; dora r16 is beaten by lora r16 (fewer parameters, more accuracy).
TOP1 = {
    ("full", 0): [94.6, 95.1, 95.3],
    ("lora", 4): [91.7, 92.0, 92.4],
    ("lora", 16): [93.2, 93.6, 93.7],
    ("dora", 4): [92.2, 92.6, 92.7],
    ("dora", 16): [93.1, 93.3, 93.8],
    ("qalora", 4): [90.8, 91.0, 91.3],
    ("qalora", 16): [92.7, 93.0, 93.2],
}
MERGED = {("qalora", 4): [90.7, 91.0, 91.1], ("qalora", 16): [92.6, 92.95, 93.2]}
IMG_S = {("full", 0): 500.0, ("lora", 4): 1000.0, ("lora", 16): 950.0, ("dora", 4): 700.0, ("dora", 16): 640.0}
IMG_S |= {("qalora", 4): 800.0, ("qalora", 16): 760.0}
OLD = {("lora", 4, 1), ("lora", 4, 2)}  # recorded before lora.method: no key, params.lora instead of params.adapter


def trainable(method: str, rank: int) -> int:
    return FULL_PARAMS if rank == 0 else ADAPTER[method, rank] + HEAD


def img_s(method: str, rank: int, seed: int) -> float:
    return IMG_S[method, rank] + 5.0 * (seed - 2)  # the seeds' throughputs average to the cell's number


def _edit_summary(run_dir, **sections) -> None:
    """Set sections of a written run's summary.json (``params``: replaced whole)."""
    path = run_dir / SUMMARY
    summary = json.loads(path.read_text())
    summary.update(sections)
    path.write_text(json.dumps(summary, indent=2) + "\n")


def build_method_study(root):
    study = root / "multirun" / "peft_methods"
    job = itertools.count()
    cells = [(m, r) for m in METHODS for r in RANKS] + [("lora", 0), ("dora", 0)]  # full FT under two methods
    for method, rank in cells:
        key = ("full", 0) if rank == 0 else (method, rank)
        for seed, top1 in zip(SEEDS, TOP1[key]):
            old = (method, rank, seed) in OLD
            overrides = [f"lora.rank={rank}"] + ([] if old else [f"lora.method={method}"])
            run = finished_run(
                study,
                str(next(job)),
                seed=seed,
                top1=top1,
                overrides=overrides,
                trainable=trainable(method, rank),
                img_s=img_s(*key, seed),
            )
            adapter = 0 if rank == 0 else ADAPTER[method, rank]
            params = {"total": FULL_PARAMS, "trainable": trainable(method, rank), "size_mb": 4.0}
            # new records: params.adapter, and a stale params.lora the adapter count must win over
            params |= {"lora": adapter} if old else {"lora": 0, "adapter": adapter}
            sections = {"params": params}
            if (method, rank) in MERGED:
                merged = MERGED[method, rank][seed - 1]
                sections["adapter"] = {
                    "merged": {
                        "top1": merged,
                        "top5": 100.0,
                        "loss": 0.3,
                        "weight_bytes": 600_000,
                        "bits": 4,
                        "group_size": 32,
                        "on_grid": True,
                    }
                }
            _edit_summary(run, **sections)
    return study


@pytest.fixture(scope="module")
def method_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft_methods")
    study = build_method_study(root)
    a = analyze_runs(study)
    out = write_report(a, root / "out")
    view = next(v for v in a.views if v.title.startswith("PEFT"))
    return a, view, out


def _row(table: pd.DataFrame, method: str, rank: int) -> pd.Series:
    match = table[(table["method"] == method) & (table["lora.rank"] == rank)]
    assert len(match) == 1, (method, rank, table[["method", "lora.rank"]])
    return match.iloc[0]


def _cells():
    return [("full", 0)] + [(m, r) for m in METHODS for r in RANKS]


@pytest.mark.slow
def test_method_table_has_a_row_per_method_and_rank(method_study):
    a, view, _ = method_study
    assert set(a.group_by) == {"lora.method", "lora.rank"}
    assert view.title == "PEFT study (method × rank)"
    t = view.table
    assert "method" in t.columns and list(t.columns[:2]) == ["method", "lora.rank"]
    assert {"adapter_params", "trainable", "img_s_vs_lora", "merged_top1", "merged_drop", "on_frontier"} <= set(t)
    assert "rank_budget" not in t  # no AdaLoRA run: no empty column
    assert len(t) == len(_cells()) and t["method"].iloc[0] == "full"
    for method, rank in _cells():
        row = _row(t, method, rank)
        values = TOP1[method, rank]
        assert row["n"] == 3
        assert row["mean"] == pytest.approx(np.mean(values))
        assert row["std"] == pytest.approx(np.std(values, ddof=1))
        assert row["trainable"] == trainable(method, rank)
        assert row["adapter_params"] == (0 if rank == 0 else ADAPTER[method, rank])
        full = np.mean(TOP1["full", 0])
        assert row["acc_retained_pct"] == pytest.approx(100 * np.mean(values) / full)
        assert row["trainable_pct"] == pytest.approx(100 * trainable(method, rank) / FULL_PARAMS)


@pytest.mark.slow
def test_throughput_against_lora_at_the_same_rank(method_study):
    t = method_study[1].table
    for method, rank in _cells():
        got = _row(t, method, rank)["img_s_vs_lora"]
        if rank == 0:  # full fine-tuning has no LoRA cell of its own
            assert np.isnan(got)
            continue
        cell = np.mean([img_s(method, rank, s) for s in SEEDS])
        lora = np.mean([img_s("lora", rank, s) for s in SEEDS])
        assert got == pytest.approx(cell / lora)


@pytest.mark.slow
def test_frontier_is_the_brute_force_pareto_front(method_study):
    t = method_study[1].table
    points = {c: (trainable(*c), np.mean(TOP1[c])) for c in _cells()}
    expected = {
        c
        for c, (p, acc) in points.items()
        if not any(q <= p and b >= acc and (q < p or b > acc) for o, (q, b) in points.items() if o != c)
    }
    got = {(r["method"], int(r["lora.rank"])) for _, r in t[t["on_frontier"]].iterrows()}
    assert got == expected and ("dora", 16) not in got and ("full", 0) in got
    frontier_lines = [h for h in method_study[1].highlights if h.startswith("on the efficient frontier")]
    assert len(frontier_lines) == len(expected)


def test_merged_accuracy_of_qalora(method_study):
    t = method_study[1].table
    for rank in RANKS:
        row = _row(t, "qalora", rank)
        assert row["merged_top1"] == pytest.approx(np.mean(MERGED["qalora", rank]))
        assert row["merged_drop"] == pytest.approx(np.mean(TOP1["qalora", rank]) - np.mean(MERGED["qalora", rank]))
    assert t.loc[t["method"] != "qalora", "merged_top1"].isna().all()
    text = "\n".join(method_study[1].highlights)
    mean, merged = np.mean(TOP1["qalora", 16]), np.mean(MERGED["qalora", 16])
    assert f"qalora r=16: {mean:.2f} before merging, {merged:.2f} after merging onto the 4-bit grid" in text


def test_best_method_per_rank(method_study):
    text = "\n".join(method_study[1].highlights)
    for rank in RANKS:
        means = {m: np.mean(TOP1[m, rank]) for m in METHODS}
        best = max(means, key=means.get)
        assert f"highest mean at r={rank}: {best} ({means[best]:.2f} test.top1" in text


def test_old_runs_without_method_count_as_lora(method_study):
    a, view, _ = method_study
    runs = a.runs
    old = runs[~runs["overrides"].str.contains("lora.method")]
    assert len(old) == len(OLD) and (old["lora.method"] == "lora").all()
    assert runs["lora.method"].notna().all()
    lora4 = a.summary[(a.summary["metric"] == "test.top1") & (a.summary["group"] == "lora.method=lora, lora.rank=4")]
    assert len(lora4) == 1 and lora4["n"].iloc[0] == 3  # old and new seeds in one cell
    assert not a.summary["group"].str.contains("null").any()


def test_full_fine_tuning_of_several_methods_is_one_row_one_run_per_seed(method_study):
    a, view, _ = method_study
    full = _row(view.table, "full", 0)
    assert full["n"] == len(SEEDS) and full["group"] == "full fine-tuning (lora.rank=0)"
    assert (a.runs["lora.rank"] == 0).sum() == 2 * len(SEEDS)  # recorded under lora and dora


def test_pareto_figure_is_written_and_linked(method_study):
    _, _, out = method_study
    png = out / "plots" / "peft_pareto.png"
    assert png.exists() and png.stat().st_size > 10_000
    report = (out / "report.md").read_text()
    assert "plots/peft_pareto.png" in report and "## PEFT study (method × rank)" in report


@pytest.mark.slow
def test_rank_sweep_table_is_unchanged(peft_study, tmp_path):
    a = analyze_runs(peft_study)
    view = next(v for v in a.views if v.title.startswith("PEFT"))
    assert view.title == "PEFT study (LoRA rank)"
    assert list(view.table.columns) == [
        "lora.rank",
        "n",
        "mean",
        "std",
        "ci95_low",
        "ci95_high",
        "trainable",
        "lora_params",
        "trainable_pct",
        "acc_retained_pct",
        "efficiency_vs_full",
        "acc_per_m_trainable",
        "on_frontier",
        "group",
    ]
    assert "lora.method" not in a.runs  # records without the key gain no column
    png = peft_pareto(view, a.metric, tmp_path / "peft_pareto.png")  # more than one rank: a figure
    assert png is not None and png.stat().st_size > 10_000


def _runs(rows: list[dict]) -> pd.DataFrame:
    base = {"status": "completed", "params.total": 1000.0}
    return pd.DataFrame([{"run_dir": f"r{i}", **base, **r} for i, r in enumerate(rows)])


def test_rankless_methods_pool_their_ranks_and_adalora_reports_its_budget():
    rows = []
    for seed in (1, 2):
        acc = 80.0 + seed
        for rank in (4, 8):  # ia3 at two ranks: one model
            rows.append(
                {"lora.method": "ia3", "lora.rank": rank, "seed": seed, "test.top1": acc, "params.trainable": 60}
            )
        rows.append(
            {"lora.method": "lora", "lora.rank": 8, "seed": seed, "test.top1": acc + 2, "params.trainable": 900}
        )
        layers = {f"adapter.final_ranks.blocks.{i}.attn.qkv": 5 for i in range(6)}
        rows.append(
            {"lora.method": "adalora", "lora.rank": 8, "seed": seed, "test.top1": acc + 1, "params.trainable": 700}
            | {"adapter.rank_budget": 30}
            | layers
        )
    view = peft_view(pd.DataFrame(), _runs(rows), "test.top1", ["lora.method", "lora.rank"])
    t = view.table
    ia3 = t[t["method"] == "ia3"]
    assert len(ia3) == 1 and ia3["lora.rank"].isna().all() and ia3["n"].iloc[0] == 2
    assert ia3["mean"].iloc[0] == pytest.approx(81.5) and ia3["group"].iloc[0] == "lora.method=ia3"
    assert np.isnan(ia3["img_s_vs_lora"].iloc[0])
    assert _row(t, "adalora", 8)["rank_budget"] == 30
    assert "merged_top1" not in t
    text = "\n".join(view.highlights)
    # init_r not recorded: the default, ceil(1.5 * r) = 12 per layer
    assert "adalora r=8: final rank budget 30 from 72 at the start (6 layers × init_r=12; target 6 × r=8)" in text
    assert "highest mean at r=8: lora (" in text
