"""Two wrong results the analysis gave, pinned: duplicated runs counted as seeds, confounded optimizer summaries."""

from __future__ import annotations

import pytest

from stackwise_bench.analysis import analyze_runs

from analysis_helpers import write_run


def cell(root, job, seed, top1, overrides=()):
    return write_run(root, job, seed=seed, overrides=list(overrides), test={"top1": top1})


def test_two_studies_sharing_runs_count_each_seed_once(tmp_path):
    """runs=[a,b] over two studies that both hold the resnet8/fp32/adamw runs of seeds 1 and 2: n = 2, not 4."""
    a, b = tmp_path / "a", tmp_path / "b"
    for seed, top1 in ((1, 90.0), (2, 92.0)):
        cell(a, f"seed={seed}", seed, top1)
        cell(b, f"seed={seed}", seed, top1)  # the same config and seed: the same run, twice
        cell(b, f"precision=bf16,seed={seed}", seed, top1 - 1, ["precision=bf16"])
    analysis = analyze_runs([a, b], metric="test.top1")
    table = analysis.summary[analysis.summary["metric"] == "test.top1"].set_index("group")
    assert table.loc["precision=fp32", "n"] == 2 and table.loc["precision=bf16", "n"] == 2
    assert not table["incomplete"].any()
    assert table.loc["precision=fp32", "std"] == pytest.approx(1.4142135, rel=1e-6)  # of 90 and 92: n = 2 truth
    assert [len(d["dropped"]) for d in analysis.duplicates] == [1, 1]
    assert all(d["spread"] == 0.0 for d in analysis.duplicates)
    assert any("2 duplicate run(s)" in w and "counted once" in w for w in analysis.warnings)


def test_a_reproducibility_rerun_is_one_seed_and_a_disagreement_is_said(tmp_path):
    cell(tmp_path, "seed=42", 42, 91.0)
    cell(tmp_path, "seed=42,trainer.progress=log", 42, 91.5, ["trainer.progress=log"])  # volatile: the same run
    analysis = analyze_runs(tmp_path, metric="test.top1")
    row = analysis.summary[analysis.summary["metric"] == "test.top1"].iloc[0]
    assert row["n"] == 1 and row["mean"] == 91.0  # not n = 2 with a zero-width interval
    [dup] = analysis.duplicates
    assert dup["spread"] == pytest.approx(0.5) and dup["kept"].endswith("seed=42")
    assert any("differ by 0.5 in test.top1" in w for w in analysis.warnings)


def test_the_optimizer_summary_compares_only_cells_that_differ_in_the_optimizer(tmp_path):
    """bf16 + extended + adamw has no sgd twin: it is listed as unmatched, not compared with fp32 + basic + sgd."""
    for seed in (1, 2, 3):
        cell(tmp_path, f"opt=sgd,{seed}", seed, 80.0 + seed, ["optimizer=sgd"])
        cell(tmp_path, f"opt=adamw,{seed}", seed, 82.0 + seed, ["optimizer=adamw"])
        confounded = ["optimizer=adamw", "precision=bf16", "augmentation=extended"]
        cell(tmp_path, f"confounded,{seed}", seed, 60.0 + seed, confounded)
    analysis = analyze_runs(tmp_path, metric="test.top1")
    [view] = [v for v in analysis.views if v.title.startswith("Optimizer study")]
    assert list(view.comparisons["group"]) == ["precision=fp32, augmentation=basic, optimizer=adamw"]
    assert view.comparisons["diff"].iloc[0] == pytest.approx(2.0)
    assert any(
        h.startswith("precision=bf16, augmentation=extended, optimizer=adamw: no optimizer=sgd cell")
        for h in view.highlights
    )
    assert not any("bf16" in h and " vs " in h for h in view.highlights)  # never compared with the fp32 sgd cell


def test_a_sweep_over_devices_is_a_cell_per_device_count(tmp_path):
    """trainer.devices does not change what is trained (one fingerprint: a run resumes on another count), but a
    sweep over it compares the counts: each is its own cell, not a duplicate of the other."""
    for seed in (1, 2):
        for devices in (1, 2):
            cell(tmp_path, f"seed={seed},trainer.devices={devices}", seed, 90.0 + seed, [f"trainer.devices={devices}"])
    analysis = analyze_runs(tmp_path, metric="test.top1")
    table = analysis.summary[analysis.summary["metric"] == "test.top1"].set_index("group")
    assert sorted(table.index) == ["trainer.devices=1", "trainer.devices=2"]
    assert list(table["n"]) == [2, 2] and not analysis.duplicates
