"""python -m stackwise_bench.evaluate zero_shot.task=lambada|hellaswag|piqa zero_shot.path=<file> on a gpt_micro run,
through the command line's own function: the recorded metrics equal stackwise_bench.lm_zero_shot's functions on the
checkpoint's weights, each task lands in its own eval folder with its directions, an evaluation study and the
analysis take the records, and every bad input is refused in one sentence with nothing left behind."""

from __future__ import annotations

import json

import pytest
import torch

from stackwise_bench.evaluate import main
from stackwise_bench.evaluation import evaluate_study

from conftest import compose, read_summary

pytest.importorskip("transformers")

# gpt_micro on the plays' bytes (tests/test_lm_evaluate.py's run): windows of 16 tokens, 4 per batch, 4 steps
TINY_LM = [
    "model=gpt_micro", "dataset=shakespeare", "trainer.max_epochs=1", "dataset.steps_per_epoch=4",
    "trainer.batch_size=4", "dataset.seq_len=16", "dataset.val_tokens=512", "dataset.test_tokens=1024",
    "trainer.threads=1", "monitors=none",
]  # fmt: skip

LAMBADA = ["To be or not to be that is the question", "ROMEO: what light through yonder window breaks", "I go"]
HELLASWAG = [
    {"activity_label": "Speaking", "ctx_a": "The king stands up.", "ctx_b": "he", "label": 0,
     "endings": ["speaks to the court.", "eats a window.", "flies away.", "sings."]},
    {"ctx": "ROMEO: My lady", "endings": ["is fair.", "zzz qqq"], "label": 0},
]  # fmt: skip
PIQA = [{"goal": "To open a door", "sol1": "turn the handle", "sol2": "eat it"}, {"goal": "To drink", "sol1": "a fork",
        "sol2": "use a cup"}]  # fmt: skip


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zero_shot_files")
    (folder / "piqa-labels.lst").write_text("0\n1\n")
    return {
        "lambada": [f"zero_shot.path={write_jsonl(folder / 'lambada.jsonl', [{'text': t} for t in LAMBADA])}"],
        "hellaswag": [f"zero_shot.path={write_jsonl(folder / 'hellaswag.jsonl', HELLASWAG)}"],
        "piqa": [
            f"zero_shot.path={write_jsonl(folder / 'piqa.jsonl', PIQA)}",
            f"zero_shot.labels={folder / 'piqa-labels.lst'}",
        ],
    }


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    from stackwise_bench.train import run

    run_dir = tmp_path_factory.mktemp("zero_shot_runs") / "gpt_micro"
    cache = f"dataset.cache_dir={tmp_path_factory.mktemp('tokens')}"
    summary = run(compose([*TINY_LM, cache]), run_dir)
    assert summary["status"] == "completed", summary.get("error")
    return run_dir


def evaluate(*argv) -> int:
    return main([str(a) for a in argv])


def checkpoint_model(run_dir):
    """The best.pt weights in a gpt_micro built here (not through evaluate's rebuild)."""
    from stackwise_bench.nn.causal_lm import build_named
    from stackwise_bench.nn.state_dict import read_checkpoint

    state, _ = read_checkpoint(run_dir / "checkpoints" / "best.pt", "cpu")
    model = build_named("gpt_micro", vocab_size=256)
    model.load_state_dict(state)
    return model.eval()


@pytest.mark.parametrize("task", ["lambada", "hellaswag", "piqa"])
def test_each_task_records_what_lm_zero_shot_scores(lm_run, files, task):
    from stackwise_bench.data.text.tokenizers import ByteTokenizer
    from stackwise_bench.lm_zero_shot import zero_shot

    before = {p.name for p in (lm_run / "eval").iterdir()} if (lm_run / "eval").exists() else set()
    assert evaluate(f"checkpoint={lm_run}", f"zero_shot.task={task}", *files[task]) == 0
    folder = lm_run / "eval" / f"best_{task}"
    assert {p.name for p in (lm_run / "eval").iterdir()} == before | {folder.name}  # its own folder, nothing else
    s = read_summary(folder)
    paths = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in files[task]}
    with torch.no_grad():  # trainer.batch_size=4: the run's eval batch on a CPU
        direct = zero_shot(
            checkpoint_model(lm_run), ByteTokenizer(), task, paths["zero_shot.path"], paths.get("zero_shot.labels"), 4
        )
    test = s["test"]
    assert s["status"] == "completed" and s["kind"] == "evaluate" and test["examples"] == direct.pop("n")
    assert {k: test[f"{task}_{k}"] for k in direct} == direct
    directions = {"lambada": {"lambada_acc": "max", "lambada_ppl": "min"}}.get(
        task, {f"{task}_acc": "max", f"{task}_acc_norm": "max"}
    )
    assert s["task"]["directions"] == directions and s["task"]["metric"] in directions
    assert s["run"]["zero_shot"]["task"] == task and len(s["run"]["zero_shot"]["sha256"]) == 64
    assert "loss" not in test and s["source"]["recorded_test_loss"] is None  # no test pass: nothing to match


def test_a_second_evaluation_gets_its_own_folder_and_the_study_skips_done_ones(lm_run, files, tmp_path):
    def lambada_folders() -> set:
        return {p.name for p in (lm_run / "eval").glob("best_lambada*")} if (lm_run / "eval").exists() else set()

    before = lambada_folders()
    assert evaluate(f"checkpoint={lm_run}", "zero_shot.task=lambada", *files["lambada"]) == 0
    assert evaluate(f"checkpoint={lm_run}", "zero_shot.task=lambada", *files["lambada"]) == 0
    new = lambada_folders() - before
    assert len(new) == 2 and new <= {"best_lambada", "best_lambada_2", "best_lambada_3"}  # never over another
    first, second = (read_summary(lm_run / "eval" / n) for n in sorted(new))
    assert first["test"]["lambada_acc"] == second["test"]["lambada_acc"]
    assert first["test"]["lambada_ppl"] == second["test"]["lambada_ppl"]
    path = files["lambada"][0].split("=", 1)[1]
    out = evaluate_study(str(lm_run.parent), None, zero_shot={"task": "lambada", "path": path}, out_dir=tmp_path)
    (row,) = out["evaluations"]
    assert row["status"] == "completed" and row["lambada_ppl"] == first["test"]["lambada_ppl"]
    assert out["test"]["lambada_acc"] == first["test"]["lambada_acc"]  # the mean over the study's one run
    assert lambada_folders() == before | new  # already done with the same checkpoint, file and settings: skipped
    assert json.loads((tmp_path / "evaluations.json").read_text())["zero_shot"]["task"] == "lambada"


def test_the_analysis_shows_the_zero_shot_metrics_with_their_directions(lm_run, files, tmp_path):
    from stackwise_bench.analysis import analyze_runs
    from stackwise_bench.analysis.report.write import write_report

    for task in ("lambada", "piqa"):
        if not (lm_run / "eval" / f"best_{task}").exists():
            assert evaluate(f"checkpoint={lm_run}", f"zero_shot.task={task}", *files[task]) == 0
    a = analyze_runs(lm_run)
    table = a.zero_shot.set_index("metric")
    assert table.loc["test.lambada_acc", "direction"] == "max" and table.loc["test.lambada_ppl", "direction"] == "min"
    assert table.loc["test.piqa_acc_norm", "direction"] == "max"
    recorded = read_summary(lm_run / "eval" / "best_piqa")["test"]["piqa_acc_norm"]
    assert table.loc["test.piqa_acc_norm", "mean"] == recorded and table.loc["test.piqa_acc_norm", "n"] == 1
    report = (write_report(a, tmp_path / "report", plots=False) / "report.md").read_text()
    assert "## Zero-shot tasks" in report
    assert "| lambada | test.lambada_ppl |" in report and "lower is better" in report


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    from stackwise_bench.train import run

    run_dir = tmp_path_factory.mktemp("zero_shot_image") / "resnet8"
    assert run(compose(["trainer.max_epochs=1", "monitors=none"]), run_dir)["status"] == "completed"
    return run_dir


def refused(capsys, *argv) -> str:
    assert evaluate(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err  # one sentence
    return err


def test_bad_input_is_refused_in_one_sentence_before_any_work(lm_run, image_run, files, tmp_path, capsys):
    lm = f"checkpoint={lm_run}"
    before = sorted(p.name for p in (lm_run / "eval").iterdir()) if (lm_run / "eval").exists() else []
    assert "zero_shot.task=mmlu" in refused(capsys, lm, "zero_shot.task=mmlu", *files["lambada"])
    missing = tmp_path / "missing.jsonl"
    assert f"zero_shot.path={missing} is not a file" in refused(
        capsys, lm, "zero_shot.task=lambada", f"zero_shot.path={missing}"
    )
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert f"zero_shot.path={binary} cannot be read" in refused(
        capsys, lm, "zero_shot.task=piqa", f"zero_shot.path={binary}"
    )
    wrong = write_jsonl(tmp_path / "lambada_rows.jsonl", [{"text": "a b c"}])  # a LAMBADA file given as HellaSwag
    err = refused(capsys, lm, "zero_shot.task=hellaswag", f"zero_shot.path={wrong}")
    assert f"zero_shot.path={wrong} line 1 is not a JSON object with endings, label" in err
    no_labels = files["piqa"][0]
    assert "rows without a label" in refused(capsys, lm, "zero_shot.task=piqa", no_labels)
    nowhere = tmp_path / "nowhere.lst"
    err = refused(capsys, lm, "zero_shot.task=piqa", no_labels, f"zero_shot.labels={nowhere}")
    assert f"zero_shot.labels={nowhere} is not a file" in err
    assert "needs the task's file" in refused(capsys, lm, "zero_shot.task=lambada")
    assert "add zero_shot.task=lambada" in refused(capsys, lm, *files["lambada"])
    assert "PIQA's labels file" in refused(capsys, lm, "zero_shot.task=lambada", *files["lambada"], files["piqa"][1])
    after = sorted(p.name for p in (lm_run / "eval").iterdir()) if (lm_run / "eval").exists() else []
    assert after == before  # nothing left behind
    err = refused(capsys, f"checkpoint={image_run}", "zero_shot.task=lambada", *files["lambada"])
    assert "scores a language model" in err and "model=resnet8" in err and not (image_run / "eval").exists()


def test_the_task_names_agree():
    from stackwise_bench.knobs import ZERO_SHOT_TASKS
    from stackwise_bench.lm_zero_shot import TASKS
    from stackwise_bench.runs.contract import ZERO_SHOT_HEADLINE, ZERO_SHOT_METRICS

    assert ZERO_SHOT_TASKS == TASKS == tuple(ZERO_SHOT_METRICS) == tuple(ZERO_SHOT_HEADLINE)
