"""The analyze command line (in a subprocess and in-process) and the torch-free promise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import stackwise_bench
from stackwise_bench.analyze import main, parse_args
from stackwise_bench.errors import ConfigError

ROOT = Path(stackwise_bench.__file__).resolve().parents[1]


def _run(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "stackwise_bench.analyze", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_cli_study_with_baseline(precision_studies, tmp_path):
    runs = "[" + ",".join(str(p) for p in precision_studies) + "]"
    out = tmp_path / "report"
    res = _run(f"runs={runs}", "baseline=precision=fp32", "metric=test.top1", f"out={out}")
    assert res.returncode == 0, res.stderr
    assert "precision augmentation" in res.stdout and "baseline" in res.stdout
    assert "paired t" in res.stdout and f"Report: {out / 'report.md'}" in res.stdout
    plots = {p.name for p in (out / "plots").glob("*.png")}  # no rank sweep, no hardware samples here
    assert plots == {"learning_curves.png", "lr_schedule.png", "throughput.png", "confusion_matrix.png"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["metric=test.top2"], "metric=test.top2 is not a numeric column"),
        (["baseline=precison=fp32"], "baseline key 'precison' is not a config choice or override"),
    ],
)
@pytest.mark.slow
def test_cli_bad_input_exits_2_with_one_sentence(peft_study, args, message):
    res = _run(f"runs={peft_study}", "plots=false", *args)
    assert res.returncode == 2
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "Traceback" not in res.stderr


def test_cli_bad_input_in_process(tmp_path, peft_study, capsys):
    (tmp_path / "empty").mkdir()
    cases = [
        [f"runs={tmp_path / 'empty'}"],
        [f"runs={tmp_path / 'nope'}"],
        ["metric=test.top1"],
        [f"runs={peft_study}", "baseline=lora.rank=3"],
        [f"runs={peft_study}", "colour=red"],
        [f"runs={peft_study}", "oops"],
        [f"runs={peft_study}", "group_by=[lora.rnak]"],
    ]
    for args in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_cli_expectation_failure_exits_1(optimizer_study, tmp_path, capsys):
    spec = tmp_path / "e.yaml"
    spec.write_text(
        yaml.safe_dump(
            [{"name": "adamw beats 95", "where": {"optimizer": "adamw"}, "metric": "test.top1", "range": [95, None]}]
        )
    )
    code = main([f"runs={optimizer_study}", f"expect={spec}", "plots=false", f"out={tmp_path / 'o'}"])
    out = capsys.readouterr().out
    assert code == 1 and "Expectations: 0 passed, 1 failed" in out and "FAIL adamw beats 95" in out
    assert (tmp_path / "o" / "validation.json").exists()


def test_parse_args():
    args = parse_args(["runs=[a,b]", "baseline=precision=fp32", "group_by=[lora.rank,model]", "plots=false"])
    assert args["runs"] == ["a", "b"] and args["baseline"] == "precision=fp32"
    assert args["group_by"] == ["lora.rank", "model"] and args["plots"] is False
    assert parse_args(["runs=multirun/x", "baseline=lora.rank=0"])["baseline"] == "lora.rank=0"
    assert parse_args(["runs=multirun/x/lora.rank=8,seed=1"])["runs"] == ["multirun/x/lora.rank=8,seed=1"]
    assert parse_args(['runs=["a/k=1,s=2",b]'])["runs"] == ["a/k=1,s=2", "b"]
    with pytest.raises(ConfigError):
        parse_args(["plots=maybe", "runs=a"])


@pytest.mark.slow
def test_torch_is_never_imported(peft_study, tmp_path):
    code = (
        "import sys\n"
        "import stackwise_bench.analysis, stackwise_bench.analyze\n"
        "assert 'torch' not in sys.modules, 'import'\n"
        "from stackwise_bench.analyze import main\n"
        f"code = main(['runs={peft_study}', 'out={tmp_path / 'o'}'])\n"
        "bad = sorted(m for m in ('torch', 'timm', 'peft', 'torchvision') if m in sys.modules)\n"
        "assert code == 0 and not bad, (code, bad)\n"
        "print('TORCH-FREE')\n"
    )
    res = _run(code=code)
    assert res.returncode == 0 and "TORCH-FREE" in res.stdout, res.stderr
