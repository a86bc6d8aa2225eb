"""python -m stackwise_bench.evaluate: a real run re-evaluated exactly, in FP8, and bad checkpoints refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from stackwise_bench.errors import ConfigError
from stackwise_bench.evaluation import evaluate_checkpoint, evaluate_study

from conftest import ROOT, read_summary

# resnet8 on the synthetic set, ~10 s: 100% test top1 on 256 test images (TINY's 64 resolve only 1.6 points).
EPOCHS = ["trainer.max_epochs=5", "monitors=none", "dataset.num_test=256"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A finished run where a study's job lands: <cwd>/multirun/AugmFP16/seed=42 (an '=' in the folder name)."""
    from stackwise_bench.train import run

    from conftest import compose

    cwd = tmp_path_factory.mktemp("evaluate")
    run_dir = cwd / "multirun" / "AugmFP16" / "seed=42"
    summary = run(compose(EPOCHS), run_dir, overrides=EPOCHS)
    assert summary["status"] == "completed" and summary["test"]["top1"] > 80.0
    return cwd, run_dir


def copy_run(run_dir, dest):
    """A private copy (without eval/), for tests that spoil or add files."""
    return shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("eval"))


@pytest.mark.slow
def test_reevaluating_best_reproduces_the_recorded_test_metrics(study):
    _, run_dir = study
    recorded = read_summary(run_dir)["test"]
    first = evaluate_checkpoint(run_dir)
    assert first["status"] == "completed" and first["kind"] == "evaluate"
    assert first["test"]["top1"] == recorded["top1"]  # exactly, not approximately
    assert (
        first["test"]["confusion_matrix"] == recorded["confusion_matrix"] and first["test"]["loss"] == recorded["loss"]
    )
    assert first["test"]["matches_recorded"] is True and first["source"]["recorded_test_top1"] == recorded["top1"]
    assert first["source"]["checkpoint_epoch"] == recorded["checkpoint_epoch"]
    eval_dir = run_dir / "eval" / "best"
    assert first["run"]["dir"] == str(eval_dir.resolve()) and read_summary(eval_dir) == first
    before = (eval_dir / "summary.json").read_text()
    second = evaluate_checkpoint(run_dir)  # never over an existing folder
    assert second["run"]["dir"] == str((run_dir / "eval" / "best_2").resolve())
    assert (eval_dir / "summary.json").read_text() == before
    assert read_summary(run_dir)["test"] == recorded  # the run's own record is untouched


@pytest.mark.slow
def test_a_pt_path_inside_the_run(study, tmp_path):
    _, run_dir = study
    summary = evaluate_checkpoint(run_dir / "checkpoints" / "last.pt", name="last_epoch")
    assert summary["run"]["dir"].endswith("eval/last_epoch")
    assert summary["source"]["recorded_test_top1"] is None  # last.pt is not what the test metrics came from
    assert summary["source"]["checkpoint_epoch"] == 5


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_weights_lose_little_and_the_report_says_how_much(study, fmt):
    _, run_dir = study
    s = evaluate_checkpoint(run_dir, quantize=fmt)
    base, test, drop, q = s["baseline"], s["test"], s["degradation"], s["quantize"]
    assert s["run"]["name"] == f"best_{fmt}"
    assert base["top1"] == read_summary(run_dir)["test"]["top1"] and base["matches_recorded"] is True
    assert drop["top1_points"] == pytest.approx(base["top1"] - test["top1"])
    if fmt == "fp8_e4m3":  # "only a little": 0.0 points here (loss +0.0096); 0.56 for resnet8 on digits
        assert drop["top1_points"] <= 1.0 and drop["loss_increase"] < 0.1 * base["loss"]
    assert len(drop["per_class_top1_points"]) == 4 and drop["worst_class"] in range(4)
    assert drop["per_class_top1_points"] == [
        round(b - a, 4) for b, a in zip(base["per_class_top1"], test["per_class_top1"])
    ]
    assert q["format"] == fmt and q["kept_high_precision"] == ["head"] and q["num_layers"] == 9
    assert q["weight_bytes_after"] < q["weight_bytes_before"] / 3.5
    assert 0 < q["weight_rel_error"] < (0.05 if fmt == "fp8_e4m3" else 0.1)


@pytest.mark.slow
def test_activation_quantization_is_recorded(study):
    _, run_dir = study
    s = evaluate_checkpoint(run_dir, quantize="fp8_e4m3", activations=True, keep_head=False)
    assert s["run"]["name"] == "best_fp8_e4m3_act_qhead"
    assert s["quantize"]["activations"] == "dynamic_per_tensor" and "head" in s["quantize"]["layers"]
    assert s["degradation"]["top1_points"] <= 5.0


def test_corrupt_checkpoint_is_one_sentence(study, tmp_path):
    _, run_dir = study
    copy = copy_run(run_dir, tmp_path / "run")
    best = copy / "checkpoints" / "best.pt"
    best.write_bytes(best.read_bytes()[:1000])  # a truncated write
    with pytest.raises(ConfigError, match=r"checkpoint=.*best\.pt could not be read as a torch checkpoint .*corrupt"):
        evaluate_checkpoint(copy)
    assert not (copy / "eval").exists()  # nothing that looks like a result


def test_checkpoint_from_a_different_model_is_one_sentence(study, tmp_path):
    from stackwise_bench.nn.models import create_model

    _, run_dir = study
    copy = copy_run(run_dir, tmp_path / "run")
    other = create_model("resnet14", num_classes=4)
    torch.save({"model": other.state_dict()}, copy / "checkpoints" / "best.pt")
    with pytest.raises(ConfigError) as info:
        evaluate_checkpoint(copy)
    message = str(info.value)
    assert "does not fit the run's model resnet8" in message and "different model" in message
    assert "\n" not in message and message.endswith(".")
    assert not (copy / "eval").exists()


def test_bad_arguments(study, tmp_path):
    _, run_dir = study
    stray = tmp_path / "stray.pt"  # outside any run folder, and unstamped (written before checkpoints named their run)
    state = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    torch.save({k: v for k, v in state.items() if k != "run"}, stray)
    with pytest.raises(ConfigError, match="is not inside a run folder"):
        evaluate_checkpoint(stray)
    with pytest.raises(ConfigError, match="does not exist"):
        evaluate_checkpoint(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="quantize=int3 is not a supported format"):
        evaluate_checkpoint(run_dir, quantize="int3")
    with pytest.raises(ConfigError, match="name=a/b must be a plain folder name"):
        evaluate_checkpoint(run_dir, name="a/b")


def test_study_evaluation_skips_what_is_done(study, tmp_path):
    cwd, run_dir = study
    runs = cwd / "multirun" / "AugmFP16"
    first = evaluate_study(str(runs), "fp8_e5m2", out_dir=tmp_path)
    assert first["status"] == "completed" and len(first["evaluations"]) == 1
    row = json.loads((tmp_path / "evaluations.json").read_text())["evaluations"][0]
    assert row["status"] == "completed" and row["seed"] == 42 and row["degradation_points"] is not None
    assert first["mean"]["degradation_points"] == row["degradation_points"]
    names = sorted(p.name for p in (run_dir / "eval").iterdir())
    again = evaluate_study(str(runs), "fp8_e5m2")
    assert again["evaluations"][0]["eval_dir"] == row["eval_dir"]
    assert sorted(p.name for p in (run_dir / "eval").iterdir()) == names  # nothing evaluated twice
    with pytest.raises(ConfigError, match=r"evaluate\.runs=.* holds no finished run"):
        evaluate_study(str(tmp_path), "fp8_e4m3")


def test_study_goes_on_past_a_bad_run_and_then_says_so(study, tmp_path):
    _, run_dir = study
    good = copy_run(run_dir, tmp_path / "study" / "seed=1")
    bad = copy_run(run_dir, tmp_path / "study" / "seed=2")
    (bad / "checkpoints" / "best.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(
        ConfigError, match=r"1 of 2 runs below .* could not be evaluated \(first: .*seed=2: ConfigError"
    ):
        evaluate_study(str(tmp_path / "study"), "fp8_e4m3", out_dir=tmp_path)
    rows = json.loads((tmp_path / "evaluations.json").read_text())["evaluations"]
    assert [r["status"] for r in rows] == ["completed", "failed"]
    assert read_summary(good / "eval" / "best_fp8_e4m3")["status"] == "completed"


@pytest.mark.slow
def test_study_reads_a_shared_dataset_once(study, tmp_path, monkeypatch):
    import stackwise_bench.data as data

    _, run_dir = study
    for seed in (1, 2):
        copy_run(run_dir, tmp_path / "study" / f"seed={seed}")
    calls = []
    real = data.make_synthetic
    monkeypatch.setattr(data, "make_synthetic", lambda *a, **k: calls.append(k) or real(*a, **k))
    result = evaluate_study(str(tmp_path / "study"), "fp8_e4m3")
    assert [r["status"] for r in result["evaluations"]] == ["completed", "completed"]
    assert len(calls) == 1  # both runs share dataset=synthetic with the same settings


@pytest.mark.slow
def test_analysis_reports_real_fp8_evaluations(study, tmp_path):
    """Real E4M3/E5M2 records of a trained run, read back by the (torch-free) analysis: the numbers the records hold."""
    from stackwise_bench.analysis import analyze_runs, find_run_dirs, write_report

    _, run_dir = study
    run = copy_run(run_dir, tmp_path / "AugmFP16" / "seed=42")
    records = {fmt: evaluate_checkpoint(run, quantize=fmt) for fmt in ("fp8_e4m3", "fp8_e5m2")}
    assert find_run_dirs(tmp_path) == [run]  # what evaluate_study walks: the eval folders are not runs
    a = analyze_runs(tmp_path / "AugmFP16")
    assert len(a.runs) == 1 and len(a.quantization) == 2
    for _, row in a.quantization.iterrows():
        s = records[row["quantize"]]
        assert row["n"] == 1 and row["top1_before_mean"] == s["baseline"]["top1"] == read_summary(run)["test"]["top1"]
        assert row["top1_after_mean"] == s["test"]["top1"]
        assert row["degradation_mean"] == pytest.approx(s["degradation"]["top1_points"])
        assert row["weight_mb_after"] == s["quantize"]["weight_bytes_after"] / 2**20
        assert row["compression"] == pytest.approx(s["quantize"]["compression"])
        assert (row["baseline_matches"], row["n_recorded"]) == (1, 1)
    md = (write_report(a, tmp_path / "analysis", plots=False) / "report.md").read_text()
    assert "## FP8 post-training quantization" in md and "reproduced the recorded test top-1 exactly in all 2" in md


def cli(module, args, cwd, timeout=300):
    import os

    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.slow
def test_cli(study, tmp_path, capsys):
    """The issue's own command (an '=' inside the value), and exit status 2 with one line for a bad checkpoint."""
    from stackwise_bench.evaluate import main

    cwd, run_dir = study
    out = cli(
        "stackwise_bench.evaluate", ["checkpoint=multirun/AugmFP16/seed=42", "quantize=fp8_e4m3", "name=from_cli"], cwd
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = read_summary(run_dir / "eval" / "from_cli")
    assert summary["status"] == "completed" and "quantize=fp8_e4m3" in summary["run"]["command"]
    assert "points)" in out.stderr and out.stdout.strip() == "multirun/AugmFP16/seed=42/eval/from_cli"  # relative
    assert "evaluating multirun/AugmFP16/seed=42/checkpoints/best.pt (epoch " in out.stderr
    assert str(cwd) not in out.stderr  # every path one way: relative to the current folder, under it
    for args in ([f"checkpoint={tmp_path}/missing.pt"], [f"checkpoint={run_dir}", "quantise=fp8_e4m3"], []):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err


@pytest.mark.slow
def test_fp8test_preset_evaluates_the_augmfp16_runs(study):
    """python -m stackwise_bench.evaluate --multirun experiment=FP8Test: both formats, for every AugmFP16 run."""
    cwd, run_dir = study
    out = cli("stackwise_bench.evaluate", ["--multirun", "experiment=FP8Test"], cwd, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for fmt in ("fp8_e4m3", "fp8_e5m2"):
        index = json.loads((cwd / "multirun" / "FP8Test" / f"evaluate.quantize={fmt}" / "evaluations.json").read_text())
        (row,) = index["evaluations"]
        assert row["status"] == "completed" and row["run"].endswith("seed=42")
        assert read_summary(row["eval_dir"])["quantize"]["format"] == fmt
    assert not (cwd / "multirun" / "FP8Test" / "evaluate.quantize=fp8_e4m3" / "summary.json").exists()
    table = out.stdout[out.stdout.index("study multirun/FP8Test: 2 jobs\n") :].splitlines()
    assert [row.split()[:2] for row in table[2:4]] == [
        ["evaluate.quantize=fp8_e4m3", "completed"],
        ["evaluate.quantize=fp8_e5m2", "completed"],
    ]
    assert table[4] == "analyse the study: python -m stackwise_bench.analyze runs=multirun/AugmFP16"


def test_train_refuses_the_evaluation_preset(tmp_path, cfg_factory):
    """experiment=FP8Test trains nothing: `train` names the command that runs it, in one sentence."""
    from stackwise_bench.train import run

    with pytest.raises(
        ConfigError,
        match=r"^experiment=FP8Test evaluates .* python -m stackwise_bench\.evaluate "
        r"--multirun experiment=FP8Test\.$",
    ):
        run(cfg_factory(["experiment=FP8Test"]), tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_last_pt_and_unfinished_runs_say_what_they_are(study, tmp_path, caplog):
    """No "(recorded None)" for last.pt (no recorded number belongs to it); a warning for an unfinished run."""
    import json

    _, run_dir = study
    run = copy_run(run_dir, tmp_path / "r")
    with caplog.at_level("INFO", logger="stackwise_bench.evaluation"):
        last = evaluate_checkpoint(run / "checkpoints" / "last.pt")
    assert last["test"]["matches_recorded"] is None
    assert f"test top1 {last['test']['top1']:.2f}%" in caplog.text and "None" not in caplog.text
    # the log names the checkpoint it evaluated, and that it is not the one the run's test metrics came from
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("evaluating ")]
    assert f"{run / 'checkpoints' / 'last.pt'} (epoch 5: last.pt, not the best.pt" in line
    assert line.endswith(f"into {run / 'eval' / 'last'}")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    caplog.clear()
    summary = read_summary(run)
    summary["status"] = "interrupted"
    (run / "summary.json").write_text(json.dumps(summary))
    with caplog.at_level("INFO", logger="stackwise_bench.evaluation"):
        evaluate_checkpoint(run)
    (warning,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "status is interrupted, not completed: best.pt holds the weights of wherever" in warning.getMessage()
