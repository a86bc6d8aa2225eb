"""report.md, table.tex, the CSVs, every plot, the never-overwrite folder and expectations."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
import yaml

from stackwise_bench.analysis import analyze_runs, load_expectations, new_output_dir, write_report
from stackwise_bench.errors import ConfigError

from fixtures_analysis import D_MODEL, HEAD, PEFT_TOP1

PLOTS = (
    "learning_curves.png",
    "lr_schedule.png",
    "accuracy_vs_rank.png",
    "accuracy_vs_params.png",
    "throughput.png",
    "hardware.png",
    "confusion_matrix.png",
    "peft_pareto.png",
)
N_RUNS = sum(len(v) for v in PEFT_TOP1.values()) + 2


@pytest.fixture(scope="module")
def report(peft_study, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "analysis"
    return write_report(analyze_runs(peft_study), out)


@pytest.mark.slow
def test_every_plot_is_written_and_linked(report):
    md = (report / "report.md").read_text()
    linked = set(re.findall(r"!\[[^\]]+\]\(([^)]+)\)", md))
    assert linked == {f"plots/{p}" for p in PLOTS}
    for p in PLOTS:
        path = report / "plots" / p
        assert path.stat().st_size > 5000, p
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_report_tables_and_csvs(report):
    runs = pd.read_csv(report / "runs.csv")
    assert len(runs) == N_RUNS and {"failed", "interrupted"} <= set(runs["status"])
    summary = pd.read_csv(report / "summary.csv")
    top1 = summary[summary["metric"] == "test.top1"].set_index("lora.rank")
    assert top1.loc[4, "mean"] == pytest.approx(sum(PEFT_TOP1[4].values()) / 6)
    stats_csv = pd.read_csv(report / "stats.csv")
    assert set(stats_csv["lora.rank"]) == {4, 8, 16}
    assert {"p_value", "p_holm", "cohens_d", "diff_ci95_low", "note"} <= set(stats_csv.columns)
    md = (report / "report.md").read_text()
    for heading in (
        "## test.top1 per cell",
        "## Comparisons against the baseline",
        "## Runs not included",
        "## Training dynamics",
        "## PEFT study",
        "## Warnings",
    ):
        assert heading in md, heading
    assert "loss is NaN at epoch 2" in md and "interrupted" in md
    assert "incomplete (missing seeds 4 5 6 7 8 9)" in md


@pytest.mark.slow
def test_table_tex_is_booktabs(report):
    tex = (report / "table.tex").read_text()
    assert tex.index(r"\toprule") < tex.index(r"\midrule") < tex.index(r"\bottomrule")
    assert r"\hline" not in tex and r"\begin{tabular}" in tex
    body = tex[tex.index(r"\midrule") : tex.index(r"\bottomrule")]
    assert body.count(r"\\") == 4  # one row per cell
    assert "lora.rank" in tex and r"$\pm$" in tex and "95\\%" in tex


@pytest.mark.slow
def test_output_folder_is_never_overwritten(peft_study, tmp_path):
    a = analyze_runs(peft_study)
    first = write_report(a, tmp_path / "analysis", plots=False)
    (first / "report.md").write_text("my edits")
    second = write_report(a, tmp_path / "analysis", plots=False)
    third = write_report(a, tmp_path / "analysis", plots=False)
    assert [first.name, second.name, third.name] == ["analysis", "analysis_2", "analysis_3"]
    assert (first / "report.md").read_text() == "my edits"
    assert not (second / "plots").exists()
    assert new_output_dir(tmp_path / "fresh").is_dir()


def test_one_never_overwrite_helper_numbers_both_kinds_of_folder(tmp_path):
    """evaluate's <run>/eval/<name>-2 and the report's analysis_2 come from the same helper."""
    from stackwise_bench.runs.files import claim_new_dir

    names = [claim_new_dir(tmp_path / "run" / "eval" / "best", sep="-").name for _ in range(3)]
    assert names == ["best", "best-2", "best-3"]
    (tmp_path / "analysis_2").mkdir()  # taken by someone else: skipped, not reused
    assert [new_output_dir(tmp_path / "analysis").name for _ in range(2)] == ["analysis", "analysis_3"]


@pytest.mark.slow
def test_default_output_folder_is_next_to_the_runs(peft_study):
    out = write_report(analyze_runs(peft_study), plots=False)
    try:
        assert out.parent == peft_study and out.name.startswith("analysis")
        assert len(analyze_runs(peft_study).runs) == N_RUNS  # the report folder is not a run
    finally:
        for f in out.iterdir():
            f.unlink()
        out.rmdir()


def _expect_file(tmp_path, trainable_head=HEAD, low=80):
    spec = {
        "expectations": [
            {"name": "accuracy in range", "metric": "test.top1", "range": [low, 100]},
            {
                "name": "LoRA trainable parameters",
                "where": {"lora.rank": {"gt": 0}},
                "metric": "params.trainable",
                "formula": "48 * d * r + head",
                "vars": {"d": D_MODEL, "head": trainable_head},
            },
            {
                "name": "head from the config",
                "where": {"lora.rank": [4, 8]},
                "metric": "params.trainable",
                "formula": "48 * d * lora.rank + d * config.dataset.num_classes + config.dataset.num_classes",
                "vars": {"d": D_MODEL},
            },
            {"name": "no such cell", "where": {"lora.rank": 64}, "metric": "test.top1", "range": [0, 1]},
        ]
    }
    path = tmp_path / "expect.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
def test_expectations_pass_and_fail(peft_study, tmp_path):
    a = analyze_runs(peft_study, expect=_expect_file(tmp_path))
    v = a.validation
    assert (v["passed"], v["failed"], v["skipped"]) == (4 + 3 + 2, 0, 1)
    lora = [r for r in v["results"] if r["name"] == "LoRA trainable parameters"]
    assert {r["cell"]["lora.rank"] for r in lora} == {4, 8, 16}
    assert all(r["value"] == r["expected"] == 48 * D_MODEL * r["cell"]["lora.rank"] + HEAD for r in lora)
    out = write_report(a, tmp_path / "out", plots=False)
    saved = json.loads((out / "validation.json").read_text())
    assert saved["passed"] == 9 and "## Expectations" in (out / "report.md").read_text()

    bad = analyze_runs(peft_study, expect=_expect_file(tmp_path, trainable_head=HEAD + 1, low=89.5))
    failed = {(r["name"], r["group"]) for r in bad.validation["results"] if r["passed"] is False}
    assert ("LoRA trainable parameters", "lora.rank=8") in failed
    means = {r: sum(v.values()) / len(v) for r, v in PEFT_TOP1.items()}
    low = {f"lora.rank={r}" for r, m in means.items() if m < 89.5}
    assert low and {g for n, g in failed if n == "accuracy in range"} == low


def test_expectation_files_are_checked(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump([{"metric": "test.top1", "formula": "__import__('os').getcwd()"}]))
    with pytest.raises(ConfigError, match="only numbers, names"):
        load_expectations(path)
    path.write_text(yaml.safe_dump([{"metric": "test.top1"}]))
    with pytest.raises(ConfigError, match="exactly one of range or formula"):
        load_expectations(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_expectations(tmp_path / "missing.yaml")


@pytest.mark.slow
def test_a_single_run_folder(tmp_path):
    from analysis_helpers import finished_run

    run = finished_run(
        tmp_path / "outputs",
        "2024-01-01_12-00-00",
        seed=1,
        top1=80.0,
        hardware=[{"t": 1.0, "cpu_percent": 99.0, "rss_mb": 700.0, "gpu_mem_mb": None}],
    )
    a = analyze_runs(run)
    assert a.group_by == [] and a.summary.iloc[0]["n"] == 1 and a.comparisons.empty
    out = write_report(a)
    assert out == tmp_path / "outputs" / "analysis"  # next to the run, never inside it
    assert {p.name for p in (out / "plots").iterdir()} == {
        "learning_curves.png",
        "lr_schedule.png",
        "throughput.png",
        "hardware.png",
        "confusion_matrix.png",
    }
    assert pd.read_csv(out / "stats.csv").empty
