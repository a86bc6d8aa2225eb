"""Evaluation records (<run>/eval/<name>/) in the analysis: never runs, and the post-training quantization section."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from stackwise_bench.analysis import (
    analyze_runs,
    collect_evaluations,
    collect_runs,
    find_eval_dirs,
    find_run_dirs,
    write_report,
)
from stackwise_bench.analyze import main
from stackwise_bench.errors import ConfigError

from analysis_helpers import finished_run, write_eval
from fixtures_analysis import QUANT_AFTER, QUANT_BYTES, QUANT_MISMATCH, QUANT_TOP1

CELLS = [(p, f) for p in QUANT_TOP1 for f in ("fp8_e4m3", "fp8_e5m2")]


def expected(prec: str, fmt: str) -> dict:
    """The cell's statistics computed here from the fixture's numbers (numpy and scipy directly)."""
    before = np.array(QUANT_TOP1[prec])
    if (prec, fmt) == QUANT_MISMATCH[:2]:
        before[QUANT_MISMATCH[2] - 1] = QUANT_MISMATCH[3]
    after = np.array(QUANT_AFTER[prec, fmt])
    drop = before - after
    return {
        "before": before.mean(),
        "before_std": before.std(ddof=1),
        "after": after.mean(),
        "after_std": after.std(ddof=1),
        "drop": drop.mean(),
        "drop_std": drop.std(ddof=1),
        "p": sps.ttest_rel(before, after).pvalue,
        "matches": 2 if (prec, fmt) == QUANT_MISMATCH[:2] else 3,
    }


@pytest.fixture(scope="module")
def analysis(quantization_study):
    return analyze_runs(quantization_study)


def row_of(table: pd.DataFrame, prec: str, fmt: str, activations: bool = False) -> pd.Series:
    sel = table[(table["precision"] == prec) & (table["quantize"] == fmt) & (table["activations"] == activations)]
    assert len(sel) == 1, sel
    return sel.iloc[0]


def test_eval_records_are_not_runs(quantization_study, tmp_path):
    runs = collect_runs(quantization_study)
    assert len(runs) == 6 and not runs["run_dir"].str.contains("/eval/").any()
    assert "kind" not in runs.columns and set(runs["status"]) == {"completed"}
    evals = find_eval_dirs(quantization_study)
    assert len(evals) == 6 * 2 + 4 and all(p.parent.name == "eval" for p in evals)  # + repeat, plain, act, failed
    run0 = quantization_study / "0"
    assert find_run_dirs(run0 / "eval") == [] and find_run_dirs(run0 / "eval" / "best_fp8_e4m3") == []
    assert find_eval_dirs(run0 / "eval" / "best_fp8_e4m3") == [run0 / "eval" / "best_fp8_e4m3"]
    with pytest.raises(ConfigError, match="holds evaluation records .* but no training run"):
        collect_runs(run0 / "eval")
    # A run folder without its own summary.json: its eval/ records are still not runs.
    bare = tmp_path / "bare"
    (bare / ".hydra").mkdir(parents=True)
    (bare / "eval" / "best").mkdir(parents=True)
    (bare / "eval" / "best" / "summary.json").write_text((run0 / "eval" / "best" / "summary.json").read_text())
    assert find_run_dirs(tmp_path) == [] and find_eval_dirs(tmp_path) == [bare / "eval" / "best"]
    # A sweep that happens to be called eval holds training runs.
    finished_run(tmp_path / "multirun" / "eval", "0", seed=1, top1=50.0)
    assert find_run_dirs(tmp_path) == [tmp_path / "multirun" / "eval" / "0"]


def test_every_record_is_collected_with_its_numbers(quantization_study):
    e = collect_evaluations(quantization_study)
    assert len(e) == 16
    assert e["status"].value_counts().to_dict() == {"completed": 15, "failed": 1}
    plain = e[e["quantize"].isna()].iloc[0]
    assert plain["top1_before"] == plain["top1_after"] == QUANT_TOP1["fp32"][0] and plain["matches_recorded"]
    assert (e["run_dir"].map(lambda d: d.rsplit("/", 1)[-1]).astype(int) < 6).all()


@pytest.mark.slow
def test_quantization_table_matches_independent_statistics(analysis):
    t = analysis.quantization
    assert len(t) == 5  # 2 precisions x 2 formats + fp32's activation-quantized E4M3
    p_values = []
    for prec, fmt in CELLS:
        r, want = row_of(t, prec, fmt), expected(prec, fmt)
        assert r["n"] == 3 and r["seeds"] == "1 2 3" and r["test"] == "paired t"
        assert r["top1_before_mean"] == pytest.approx(want["before"])
        assert r["top1_before_std"] == pytest.approx(want["before_std"])
        assert r["top1_after_mean"] == pytest.approx(want["after"])  # the stale repeat (50.0) is not used
        assert r["top1_after_std"] == pytest.approx(want["after_std"])
        assert r["degradation_mean"] == pytest.approx(want["drop"])
        assert r["degradation_std"] == pytest.approx(want["drop_std"])
        assert r["p_value"] == pytest.approx(want["p"], rel=1e-9)
        assert r["degradation_ci95_low"] < want["drop"] < r["degradation_ci95_high"]
        assert r["weight_mb_before"] == pytest.approx(QUANT_BYTES[fmt][0] / 2**20)
        assert r["weight_mb_after"] == pytest.approx(QUANT_BYTES[fmt][1] / 2**20)
        assert r["compression"] == pytest.approx(QUANT_BYTES[fmt][0] / QUANT_BYTES[fmt][1])
        assert (r["baseline_matches"], r["n_recorded"]) == (want["matches"], 3)
        p_values.append((r.name, want["p"]))
    holm = multipletests([p for _, p in p_values], method="holm")[1]
    for (index, _), adjusted in zip(p_values, holm):
        assert t.loc[index, "p_holm"] == pytest.approx(adjusted)
    act = row_of(t, "fp32", "fp8_e4m3", activations=True)
    assert act["n"] == 1 and np.isnan(act["p_value"]) and act["test"] == "none"
    assert act["degradation_mean"] == pytest.approx(QUANT_TOP1["fp32"][0] - 88.0)
    assert "1 of the cell's 3 finished runs evaluated" in act["note"]


@pytest.mark.slow
def test_the_report_section(analysis, tmp_path):
    out = write_report(analysis, tmp_path / "analysis")
    md = (out / "report.md").read_text()
    section = md[md.index("## FP8 post-training quantization") : md.index("## Other metrics")]
    assert "13 evaluation record(s)" in section and "(FP8 E4M3, FP8 E5M2)" in section
    for prec, fmt in CELLS:
        w = expected(prec, fmt)
        line = next(x for x in section.splitlines() if x.startswith(f"| precision={prec} | {fmt} | weights, head"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[3:7] == [
            "3",
            f"{w['before']:.2f} ± {w['before_std']:.2f}",
            f"{w['after']:.2f} ± {w['after_std']:.2f}",
            f"{w['drop']:+.2f} ± {w['drop_std']:.2f}",
        ]
        assert cells[8].startswith(f"{w['p']:.3f} (")
        assert cells[9:12] == [
            f"{QUANT_BYTES[fmt][0] / 2**20:.3f} → {QUANT_BYTES[fmt][1] / 2**20:.3f}",
            f"{QUANT_BYTES[fmt][0] / QUANT_BYTES[fmt][1]:.2f}×",
            f"{w['matches']}/3",
        ]
    prec, fmt, seed, value = QUANT_MISMATCH
    assert "reproduced the recorded test top-1 in only 12 of 13 records" in section
    assert f"recorded {QUANT_TOP1[prec][seed - 1]}, re-evaluated {value}" in section
    assert "![Post-training quantization](plots/quantization.png)" in md
    assert (out / "plots" / "quantization.png").read_bytes()[:4] == b"\x89PNG"
    assert "1 evaluation record(s) not completed (1 failed)" in md and "the latest of each is used" in md
    saved = pd.read_csv(out / "quantization.csv")
    assert saved["degradation_mean"].tolist() == pytest.approx(analysis.quantization["degradation_mean"].tolist())
    used = pd.read_csv(out / "evaluations.csv")
    assert len(used) == 13 and 50.0 not in set(used["top1_after"])
    assert len(pd.read_csv(out / "runs.csv")) == 6
    assert "quantization.csv" in md[md.index("## Files") :]


@pytest.mark.slow
def test_the_command_line_prints_the_section(quantization_study, tmp_path, capsys):
    assert main([f"runs={quantization_study}", "plots=false", f"out={tmp_path / 'o'}"]) == 0
    screen = capsys.readouterr().out
    block = screen[screen.index("Post-training quantization:") :]
    w = expected("fp32", "fp8_e5m2")
    drop = re.escape(f"{w['drop']:+.2f} ± {w['drop_std']:.2f}")
    assert re.search(rf"precision=fp32\s+fp8_e5m2\s+weights, head kept\s+3\s+.*{drop}", block), block


@pytest.mark.slow
def test_no_section_without_records(peft_study, tmp_path):
    a = analyze_runs(peft_study)
    assert a.quantization.empty and a.evaluations.empty
    out = write_report(a, tmp_path / "o", plots=False)
    assert "quantization" not in (out / "report.md").read_text()
    assert not (out / "quantization.csv").exists()


def test_records_of_runs_not_analysed_are_left_out_with_a_warning(tmp_path):
    ours = finished_run(tmp_path / "study", "0", seed=1, top1=90.0)
    other = finished_run(tmp_path / "elsewhere", "0", seed=2, top1=80.0)
    write_eval(ours, "best_fp8_e4m3", quantize="fp8_e4m3", after=89.0)
    write_eval(other, "best_fp8_e4m3", quantize="fp8_e4m3", after=70.0)
    a = analyze_runs([tmp_path / "study", other / "eval"])
    assert len(a.runs) == 1 and len(a.evaluations) == 2
    (row,) = a.quantization.to_dict("records")
    assert row["n"] == 1 and row["degradation_mean"] == pytest.approx(1.0) and row["group"] == "all runs"
    assert any("not among the finished runs analysed" in w and "add their run folders" in w for w in a.warnings)
    summary = json.loads((other / "eval" / "best_fp8_e4m3" / "summary.json").read_text())
    assert summary["kind"] == "evaluate"  # the fabricated record has evaluate's shape


def test_an_fp8test_folder_names_the_study_to_analyse(tmp_path):
    """experiment=FP8Test's own folder holds evaluations.json, not runs: the error names the study it evaluated."""
    job = tmp_path / "multirun" / "FP8Test" / "experiment=FP8Test"
    job.mkdir(parents=True)
    (job / "evaluations.json").write_text(json.dumps({"runs": "multirun/AugmFP16", "evaluations": []}))
    with pytest.raises(ConfigError, match=re.escape("analyse those: runs=multirun/AugmFP16.")):
        collect_runs(tmp_path / "multirun" / "FP8Test")
    (job / "evaluations.json").unlink()
    with pytest.raises(ConfigError, match="holds no run folders"):
        collect_runs(tmp_path / "multirun" / "FP8Test")
