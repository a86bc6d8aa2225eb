"""Observability in the analysis: diagnostics.jsonl read back, the per-layer gradient heatmap, the hardware
figure's power/temperature panels, energy and throttling in the tables, the precision study's energy line.

Every expected number is recomputed here from the numbers the hand-built runs were given.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from stackwise_bench.analysis import analyze_runs, collect_diagnostics, collect_hardware, collect_runs, write_report
from stackwise_bench.analysis.plots.curves import hardware_figure, hardware_panels, hardware_series
from stackwise_bench.analysis.plots.layers import grad_norm_figure, grad_norm_grids, grad_norm_heatmap
from stackwise_bench.analysis.read.diagnostics import merge_orders
from stackwise_bench.analysis.read.formatting import column_digits
from stackwise_bench.analysis.report.headline import headline_table
from stackwise_bench.analysis.studies.energy import energy_highlight, energy_note
from stackwise_bench.analyze import main
from stackwise_bench.runs.record import RunRecord

from analysis_helpers import finished_run

LAYERS = ["stem", "stage1.0", "stage2.0", "stage3.0", "head"]  # model order; alphabetical puts head first
STEPS = [(50, 1), (100, 1), (150, 2)]  # (global step, epoch) of the logging steps
SEEDS = (1, 2, 3)
# (energy_j, energy_j_per_img) per (precision, seed); bf16 seed 3 ran without a GPU or RAPL: null.
ENERGY = {
    ("fp32", 1): (1200.0, 0.80),
    ("fp32", 2): (1260.0, 0.84),
    ("fp32", 3): (1230.0, 0.82),
    ("bf16", 1): (700.0, 0.47),
    ("bf16", 2): (760.0, 0.51),
    ("bf16", 3): (None, None),
}
# (thermal_throttled, throttle_reasons) per run; None = no GPU to ask.
THROTTLE = {("bf16", 1): (True, ["hw_thermal_slowdown", "sw_power_cap"]), ("bf16", 2): (False, ["sw_power_cap"])}
NO_DIAGNOSTICS = ("fp32", 3)  # diagnostics=none: no file
TORN = ("bf16", 2)  # crashed while writing its last line
POWER = {("fp32", 1): 200.0, ("fp32", 2): 210.0, ("fp32", 3): 220.0, ("bf16", 1): 100.0, ("bf16", 2): 110.0}


def grad_norm(layer: int, seed: int, step: int) -> float:
    return (layer + 1) * 0.1 * seed * (1 + step / 100)


def hardware_rows(prec: str, seed: int) -> list[dict]:
    """Six samples; no CPU temperature sensor anywhere, no GPU at all for bf16 seed 3 (every GPU key null)."""
    power = POWER.get((prec, seed))
    gpu = power is not None
    return [
        {
            "t": float(i),
            "cpu_percent": 100.0 + i,
            "rss_mb": 500.0,
            "gpu_mem_mb": 900.0 if gpu else None,
            "gpu_util": 80.0 if gpu else None,
            "gpu_power_w": power + i if gpu else None,
            "gpu_energy_j": (power + i) * i if gpu else None,
            "gpu_temp_c": 60.0 + i if gpu else None,
            "gpu_sm_clock_mhz": 1800.0 if gpu else None,
            "gpu_throttle": [] if gpu else None,
            "cpu_freq_mhz": 3000.0,
            "cpu_temp_c": None,
            "cpu_energy_j": None,
        }
        for i in range(6)
    ]


def diagnostics_lines(seed: int) -> list[str]:
    rows = []
    for step, epoch in STEPS:
        rows.append(
            {
                "kind": "step",
                "step": step,
                "epoch": epoch,
                "grad_norm": None if step == 100 else 2.0 * seed,  # null reading: left out, never 0
                "grad_norm_mean": 1.5,
                "grad_norm_max": 3.0,
                "nonfinite_steps": 0,
                "layers": {
                    name: {"grad_norm": grad_norm(i, seed, step), "weight_norm": 10.0 + i, "update_ratio": 1e-3}
                    for i, name in enumerate(LAYERS)
                },
                "activations": {"stage1.0": {"mean": 0.1, "std": 1.0, "rms": 1.2, "zero_frac": 0.4, "ch_rms_max": 3.0}},
            }
        )
    weights = {name: {"norm": 10.0 + i, "mean": 0.0, "std": 0.1, "max_abs": 0.5, "near_zero_frac": 0.01,
                      "trainable": name != "stem"} for i, name in enumerate(LAYERS)}  # fmt: skip
    rows.append({"kind": "weights", "step": 150, "layers": weights})
    return [json.dumps(r) for r in rows]


def build_study(root):
    study = root / "multirun" / "obs"
    for job, (prec, seed) in enumerate((p, s) for p in ("fp32", "bf16") for s in SEEDS):
        run = finished_run(
            study,
            str(job),
            seed=seed,
            top1=90.0 + seed,
            choices={"precision": prec},
            hardware=hardware_rows(prec, seed),
        )
        energy, per_img = ENERGY[prec, seed]
        throttled, reasons = THROTTLE.get((prec, seed), (False, []) if prec == "fp32" else (None, None))
        RunRecord(run).update(
            resources={
                "energy_j": energy,
                "energy_j_per_img": per_img,
                "thermal_throttled": throttled,
                "throttle_reasons": reasons,
            }
        )
        if (prec, seed) == NO_DIAGNOSTICS:
            continue
        lines = diagnostics_lines(seed)
        if (prec, seed) == TORN:
            lines.append('{"kind": "step", "step": 200, "epoch": 2, "layers": {"stem": {"grad_n')
        (run / "diagnostics.jsonl").write_text("\n".join(lines) + ("" if (prec, seed) == TORN else "\n"))
    return study


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return build_study(tmp_path_factory.mktemp("observability"))


@pytest.fixture(scope="module")
def analysis(study):
    return analyze_runs(study)


def _run_dir(runs: pd.DataFrame, prec: str, seed: int) -> str:
    return runs.loc[(runs["precision"] == prec) & (runs["seed"] == seed), "run_dir"].item()


def test_collect_diagnostics_reads_values_back_and_skips_a_torn_line(study):
    runs = collect_runs(study)
    diag = collect_diagnostics(runs)
    assert {"run_dir", "precision", "seed", "kind", "step", "epoch", "layer", "metric", "value"} <= set(diag.columns)
    assert _run_dir(runs, *NO_DIAGNOSTICS) not in set(diag["run_dir"])
    torn = diag[diag["run_dir"] == _run_dir(runs, *TORN)]
    assert sorted(torn.loc[torn["kind"] == "step", "step"].unique()) == [50, 100, 150]  # the half line is skipped
    for prec, seed in [k for k in ENERGY if k != NO_DIAGNOSTICS]:
        d = diag[diag["run_dir"] == _run_dir(runs, prec, seed)].set_index(["kind", "step", "layer", "metric"])
        for step, epoch in STEPS:
            for i, name in enumerate(LAYERS):
                assert d.loc[("step", step, name, "grad_norm"), "value"] == grad_norm(i, seed, step)
                assert d.loc[("step", step, name, "weight_norm"), "value"] == 10.0 + i
            assert d.loc[("step", step, "stage1.0", "act_rms"), "value"] == 1.2
            assert d.loc[("step", step, "stem", "grad_norm"), "epoch"] == epoch
        whole = diag[diag["layer"].isna() & (diag["metric"] == "grad_norm")]
        whole = whole[whole["run_dir"] == _run_dir(runs, prec, seed)]
        assert sorted(whole["step"]) == [50, 150] and set(whole["value"]) == {2.0 * seed}  # null left out
        assert d.loc[("weights", 150, "head", "weight_norm"), "value"] == 14.0
        assert d.loc[("weights", 150, "stem", "weight_trainable"), "value"] == 0.0
    # A run folder (not a DataFrame) works too, and a study without any file gives an empty table with the columns.
    assert len(collect_diagnostics(study)) == len(diag)
    empty = collect_diagnostics(runs[runs["run_dir"] == _run_dir(runs, *NO_DIAGNOSTICS)])
    assert empty.empty and {"layer", "metric", "value"} <= set(empty.columns)


def test_layer_order_follows_the_model_and_a_grown_stack():
    assert merge_orders([["stem", "blocks.0", "head"], ["stem", "blocks.0", "blocks.1", "head"]]) == [
        "stem",
        "blocks.0",
        "blocks.1",
        "head",
    ]
    vit = ["patch_embed", *(f"blocks.{i}" for i in range(12)), "norm", "head"]
    assert merge_orders([vit, vit]) == vit  # blocks.10 after blocks.9, not after blocks.1


@pytest.mark.slow
def test_grad_norm_heatmap_one_panel_per_cell_in_model_order(study, tmp_path):
    runs = collect_runs(study)
    diag = collect_diagnostics(runs)
    grids = grad_norm_grids(diag, ["precision"])
    assert set(grids) == {"precision=fp32", "precision=bf16"}
    seeds = {"fp32": [1, 2], "bf16": [1, 2, 3]}  # fp32 seed 3 logged no diagnostics
    for prec, grid in ((p, grids[f"precision={p}"]) for p in seeds):
        assert list(grid.index) == LAYERS and list(grid.columns) == [s for s, _ in STEPS]
        for i, name in enumerate(LAYERS):
            for step, _ in STEPS:
                expected = np.log10(np.mean([grad_norm(i, s, step) for s in seeds[prec]]))
                assert grid.loc[name, step] == pytest.approx(expected)
    fig = grad_norm_figure(diag, ["precision"])
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert sorted(ax.get_title() for ax in panels) == sorted(grids)
    for ax in panels:
        fig.canvas.draw()
        assert [t.get_text() for t in ax.get_yticklabels()] == LAYERS  # top to bottom: ylim runs downwards
        assert ax.get_ylim()[0] > ax.get_ylim()[1]
    path = grad_norm_heatmap(diag, ["precision"], tmp_path / "grad_norms.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert grad_norm_heatmap(diag.iloc[:0], ["precision"], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


@pytest.mark.slow
def test_hardware_figure_draws_sampled_panels_and_never_averages_nulls_as_zero(study):
    hardware = collect_hardware(collect_runs(study))
    assert {"gpu_power_w", "gpu_temp_c", "seq", "cpu_temp_c"} <= set(hardware.columns)
    panels = [c for c, _ in hardware_panels(hardware)]
    assert panels == ["cpu_percent", "rss_mb", "gpu_util", "gpu_mem_mb", "gpu_power_w", "gpu_temp_c"]  # no CPU temp
    data = hardware_series(hardware, ["precision"])
    bf16 = data[data["group"] == "precision=bf16"].groupby("t_grid")["gpu_power_w"].mean()
    expected = [np.mean([POWER["bf16", s] + i for s in (1, 2)]) for i in range(6)]  # seed 3 has no GPU: not a 0
    assert bf16.to_numpy() == pytest.approx(expected)
    fig = hardware_figure(hardware, ["precision"])
    titles = {ax.get_title(): ax for ax in fig.axes}
    assert "CPU temperature" not in titles and {"GPU power", "GPU temperature"} <= set(titles)
    lines = [sorted(line.get_ydata()) for line in titles["GPU power"].get_lines() if len(line.get_ydata())]
    assert any(y == pytest.approx(expected) for y in lines)


def test_energy_and_throttling_in_the_headline_table(analysis):
    a = analysis
    head = headline_table(a.summary, a.comparisons, a.metric, a.group_by, a.baseline, runs=a.runs).set_index(
        "precision"
    )
    assert list(head.columns[-4:]) == ["energy (J)", "energy (J/img)", "thermal throttling", "flags"]
    fp32_j = [ENERGY["fp32", s][0] for s in SEEDS]
    bf16_j = [ENERGY["bf16", s][0] for s in (1, 2)]  # seed 3's null is left out, never a 0
    assert head.loc["fp32", "energy (J)"] == f"{np.mean(fp32_j):,.0f} ± {np.std(fp32_j, ddof=1):,.0f}"
    assert head.loc["bf16", "energy (J)"] == f"{np.mean(bf16_j):,.0f} ± {np.std(bf16_j, ddof=1):,.0f} (2 of 3 runs)"
    fp32_i = [ENERGY["fp32", s][1] for s in SEEDS]
    bf16_i = [ENERGY["bf16", s][1] for s in (1, 2)]
    assert head.loc["fp32", "energy (J/img)"] == f"{np.mean(fp32_i):.2f} ± {np.std(fp32_i, ddof=1):.2f}"
    assert head.loc["bf16", "energy (J/img)"] == f"{np.mean(bf16_i):.2f} ± {np.std(bf16_i, ddof=1):.2f} (2 of 3 runs)"
    assert head.loc["fp32", "thermal throttling"] == "no"
    assert head.loc["bf16", "thermal throttling"] == "1/2 (hw_thermal_slowdown, sw_power_cap)"
    plain = headline_table(a.summary, a.comparisons, a.metric, a.group_by, a.baseline)
    assert "energy (J)" not in plain.columns  # without the runs: the table as before


def test_precision_summary_names_the_most_energy_efficient_cell(analysis):
    (view,) = [v for v in analysis.views if v.title == "Precision study"]
    t = view.table.set_index("precision")
    bf16 = np.mean([ENERGY["bf16", s][1] for s in (1, 2)])
    fp32 = np.mean([ENERGY["fp32", s][1] for s in SEEDS])
    assert t.loc["bf16", "energy_j_per_img"] == pytest.approx(bf16)
    assert t.loc["bf16", "energy_vs_fp32"] == pytest.approx(bf16 / fp32)
    assert t.loc["fp32", "energy_j"] == pytest.approx(np.mean([ENERGY["fp32", s][0] for s in SEEDS]))
    expected = f"precision=bf16 is the most energy-efficient: {bf16:.3g} J/img, {bf16 / fp32:.2f}x fp32"
    assert expected in view.highlights


def test_energy_highlight_needs_two_cells_and_small_values_keep_their_digits():
    table = pd.DataFrame(
        {
            "precision": ["fp32", "fp16", "bf16"],
            "group": ["precision=fp32", "precision=fp16", "precision=bf16"],
            "energy_j_per_img": [0.0042, 0.0061, np.nan],
            "energy_vs_fp32": [1.0, 0.0061 / 0.0042, np.nan],
        }
    )
    assert energy_highlight(table) == "precision=fp32 is the most energy-efficient: 0.0042 J/img"  # no ratio to itself
    assert energy_highlight(table.iloc[[0, 2]]) is None  # one cell with a reading is no comparison
    assert column_digits(table["energy_j_per_img"]) == 4  # 0.0042, 0.0061: not 0.00
    assert column_digits([91.5, 0.01]) == 2 and column_digits([1500.0, 0.5]) == 0  # as before


@pytest.mark.slow
def test_no_energy_readings_no_energy_columns_and_one_sentence(tmp_path):
    for seed in (1, 2):
        run = finished_run(tmp_path / "null", str(seed), seed=seed, top1=90.0, choices={"precision": "fp16"})
        RunRecord(run).update(resources={"energy_j": None, "energy_j_per_img": None, "thermal_throttled": None})
        finished_run(tmp_path / "old", str(seed), seed=seed, top1=90.0, choices={"precision": "fp16"})
    for folder, says in (("null", "no GPU power counter"), ("old", "have no resources.energy_j")):
        a = analyze_runs(tmp_path / folder)
        head = headline_table(a.summary, a.comparisons, a.metric, a.group_by, a.baseline, runs=a.runs)
        assert not {"energy (J)", "energy (J/img)", "thermal throttling"} & set(head.columns)
        assert says in energy_note(a.runs) and energy_note(a.runs).startswith("No energy readings")
        assert not any("energy" in h for v in a.views for h in v.highlights)
        md = (write_report(a, tmp_path / f"out_{folder}", plots=False) / "report.md").read_text()
        assert energy_note(a.runs) in md


@pytest.mark.slow
def test_analyze_writes_both_figures_and_the_report_lists_them(study, tmp_path, capsys):
    out = tmp_path / "analysis"
    assert main([f"runs={study}", f"out={out}"]) == 0
    screen = capsys.readouterr().out
    assert "energy (J/img)" in screen and "most energy-efficient" in screen
    md = (out / "report.md").read_text()
    linked = set(re.findall(r"!\[[^\]]+\]\(([^)]+)\)", md))
    assert {"plots/hardware.png", "plots/grad_norms.png"} <= linked
    assert "### Per-layer gradient norms" in md and "### Hardware use over time" in md
    for name in ("hardware.png", "grad_norms.png"):
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| energy (J) | energy (J/img) | thermal throttling |" in md
    assert "No energy readings" not in md


def test_the_energy_note_reads_right_for_one_run_and_many():
    import pandas as pd

    from stackwise_bench.analysis.studies.energy import energy_note

    one = pd.DataFrame({"status": ["completed"], "resources.energy_j": [None]})
    assert energy_note(one).startswith("No energy readings: the run had no GPU power counter")
    assert energy_note(pd.concat([one, one])).startswith("No energy readings: the runs had no GPU power counter")
    old = pd.DataFrame({"status": ["completed"]})
    assert "the run's record has no resources.energy_j" in energy_note(old)
    assert "the runs' records have no resources.energy_j" in energy_note(pd.concat([old, old]))
