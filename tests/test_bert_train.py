"""BERT encoders through the training entrypoint: masked-LM pretraining (model=bert_micro dataset=shakespeare), GLUE
fine-tuning (dataset=glue on tiny folders in GLUE's layout, built here), a fine-tune from a pretraining run, depth as
time on the encoder, and the refusals; in-process on the real composed config, once through the command line."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from test_glue import make_glue

from stackwise_bench.build import build_run
from stackwise_bench.errors import ConfigError
from stackwise_bench.train import run

from conftest import ROOT, compose, read_metrics, read_summary

TIMING_KEYS = {"epoch_time_s", "train_token_s", "train_seq_s", "eval_time_s"}
STEPS = 4  # dataset.steps_per_epoch


def mlm(cache, *extra: str) -> list[str]:
    """bert_micro on the plays' bytes: windows of 16 tokens, 4 per batch, 4 steps per epoch, 3 epochs, no dropout."""
    return [
        "model=bert_micro",
        "dataset=shakespeare",
        "model.dropout=0.0",
        "trainer.max_epochs=3",
        f"dataset.steps_per_epoch={STEPS}",
        "trainer.batch_size=4",
        "dataset.seq_len=16",
        "dataset.val_tokens=512",
        "dataset.test_tokens=1024",
        "optimizer.lr=3e-3",
        f"dataset.cache_dir={cache}",
        "trainer.threads=1",
        *extra,
    ]


def glue(root, task: str, *extra: str) -> list[str]:
    """bert_micro fine-tuned on a tiny GLUE folder: rows of at most 32 tokens, 8 per batch, 3 epochs."""
    return [
        "model=bert_micro",
        "dataset=glue",
        f"dataset.task={task}",
        f"dataset.root={root}",
        "dataset.seq_len=32",
        "model.dropout=0.0",
        "trainer.max_epochs=3",
        "trainer.batch_size=8",
        "optimizer.lr=3e-3",
        "trainer.threads=1",
        *extra,
    ]


def numbers(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tokens")


@pytest.fixture(scope="module")
def glue_root(tmp_path_factory):
    return make_glue(tmp_path_factory.mktemp("glue"))


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory, cache):
    run_dir = tmp_path_factory.mktemp("mlm") / "baseline"
    cfg = compose(mlm(cache))
    return cfg, run_dir, run(cfg, run_dir)


@pytest.mark.parametrize(
    "option, params", [("bert_tiny", 4_416_698), ("bert_base", 109_514_298), ("bert_large", 335_174_458)]
)
def test_published_sizes_have_their_published_parameter_counts(option, params):
    """conf/model/bert_*.yaml with WordPiece's 30,522 ids, as BertForMaskedLM (built on the meta device)."""
    from hydra.utils import instantiate

    cfg = compose([f"model={option}", "dataset=shakespeare"])
    with torch.device("meta"):
        model = instantiate(cfg.model, vocab_size=30522)
    assert sum(p.numel() for p in model.parameters()) == params


# --- masked-LM pretraining ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_mlm_trains_and_records_masked_token_metrics(mlm_run):
    _, run_dir, summary = mlm_run
    assert summary == read_summary(run_dir) and summary["status"] == "completed"
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [4, 8, 12]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] < math.log(260)  # learns, from below chance at the first epoch
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    # pinned on a CPU with one thread (fp32, deterministic kernels): the data, the masks, the model or the loop move it
    assert rows[0]["val_loss"] == pytest.approx(PINNED_FIRST_VAL_LOSS, abs=1e-4)
    for r in rows:
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"])) and 0 <= r["val_acc"] <= 100
    task, test = summary["task"], summary["test"]
    assert task["name"] == "masked_lm" and task["metric"] == "loss" and task["unit"] == "token"
    assert task["directions"] == {"loss": "min", "ppl": "min", "acc": "max"}
    assert task["special_tokens"] == {"pad": 256, "cls": 257, "sep": 258, "mask": 259, "vocab_size": 260}
    assert task["mask_prob"] == 0.15
    assert test["ppl"] == pytest.approx(math.exp(test["loss"])) and test["masked"] > 0
    train = summary["train"]
    n = summary["params"]["total"] - 128 * 64 - 2 * 64  # less the position and segment embeddings (lookups)
    assert train["flops_per_token"] == 6 * n + 12 * 2 * 2 * 32 * 16  # 6N + 12·L·H·Q·T
    assert train["flops"] == pytest.approx(train["flops_per_token"] * 3 * STEPS * 4 * 16)
    assert summary["params"]["depth"] == 2 and summary["params"]["embed_dim"] == 64


PINNED_FIRST_VAL_LOSS = 5.232070  # see test_mlm_trains_and_records_masked_token_metrics


@pytest.mark.slow
def test_mlm_rerun_is_bit_identical(mlm_run, tmp_path):
    cfg, first_dir, summary = mlm_run
    again = run(cfg, tmp_path / "again")
    assert numbers(read_metrics(tmp_path / "again")) == numbers(read_metrics(first_dir))
    assert again["test"]["loss"] == summary["test"]["loss"]


@pytest.mark.slow
def test_mlm_interrupt_and_resume_matches_uninterrupted(mlm_run, tmp_path, monkeypatch, cache):
    """SIGINT at step 3 of epoch 2: the resume draws the windows and the masks the uninterrupted run drew."""
    _, full_dir, full = mlm_run
    calls = {"n": 0}
    original_step = torch.optim.lr_scheduler.LambdaLR.step

    def step_then_signal(self, *args, **kwargs):
        original_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1 + STEPS + 3:  # LambdaLR steps once when it is built
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "step", step_then_signal)
    run_dir = tmp_path / "cut"
    assert run(compose(mlm(cache)), run_dir)["status"] == "interrupted"
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["progress"]["epoch"] == 1 and state["progress"]["step"] == 3
    monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "step", original_step)
    resumed = run(compose(mlm(cache, "trainer.resume=true")), run_dir)
    assert resumed["status"] == "completed" and resumed["run"]["resumed"]
    assert numbers(read_metrics(run_dir)) == numbers(read_metrics(full_dir))
    assert resumed["test"]["loss"] == full["test"]["loss"]


# --- depth as time on the encoder -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_depth_time_grows_bert_micro_and_identity_keeps_its_logits(tmp_path, cache):
    """Through the regime: bert_micro starts at 1 block and grows to 2 (regime.init=identity keeps the function of a
    freshly built encoder exactly), then a whole run records the depths and tests the grown encoder."""
    cfg = compose(mlm(cache, "regime=depth_time", "regime.init=identity", "model.n_layer=4"))
    built = build_run(cfg, resume=False)
    regime, model = built.regime, built.model
    assert regime.stacks == [1, 2, 4] and len(model.bert.encoder.layer) == 1 and regime.growth_steps == [4, 8]
    x = torch.randint(0, 260, (2, 16), generator=torch.Generator().manual_seed(0))
    model.eval()
    before = model(input_ids=x).logits
    grew = regime.before_step(4, model, built.optimizer, built.scheduler)
    assert grew["depth"] == 2 and len(model.bert.encoder.layer) == 2 and model.config.num_hidden_layers == 2
    torch.testing.assert_close(model(input_ids=x).logits, before, rtol=0, atol=1e-5)
    new = {id(p) for p in model.bert.encoder.layer[1].parameters()}
    assert new <= {id(p) for group in built.optimizer.param_groups for p in group["params"]}

    summary = run(compose(mlm(cache, "regime=depth_time")), tmp_path / "grow")
    assert [r["depth"] for r in read_metrics(tmp_path / "grow")] == [1, 2, 2]
    assert summary["test"]["checkpoint_depth"] == 2 and summary["params"]["depth"] == 2
    assert summary["train"]["stacks"] == [1, 2]


# --- GLUE fine-tuning -----------------------------------------------------------------------------------------------


def _recorded_against_sklearn(task: str, rows: list[dict]) -> dict:
    pred, label = np.array([r["pred"] for r in rows]), np.array([r["label"] for r in rows])
    if task == "cola":
        return {"mcc": 100 * matthews_corrcoef(label, pred)}
    if task == "mrpc":
        return {"f1": 100 * f1_score(label, pred), "acc": 100 * accuracy_score(label, pred)}
    return {"pearson": 100 * pearsonr(pred, label)[0], "spearman": 100 * spearmanr(pred, label)[0]}


@pytest.mark.slow
@pytest.mark.parametrize("task, headline", [("cola", "mcc"), ("mrpc", "f1"), ("stsb", "pearson")])
def test_glue_fine_tune_records_glue_metrics_of_its_predictions(task, headline, glue_root, tmp_path):
    summary = run(compose(glue(glue_root, task)), tmp_path / task)
    assert summary["status"] == "completed"
    assert summary["task"]["name"] == "glue" and summary["task"]["glue_task"] == task
    assert summary["task"]["metric"] == headline and summary["task"]["directions"][headline] == "max"
    rows = [json.loads(line) for line in (tmp_path / task / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and {r["part"] for r in rows} == {"dev"}  # dev is the test split
    expected = _recorded_against_sklearn(task, rows)
    for key, value in expected.items():
        assert summary["test"][key] == pytest.approx(value, abs=1e-3), key
    assert summary["test"]["score"] == pytest.approx(sum(expected.values()) / len(expected), abs=1e-3)
    split = json.loads((tmp_path / task / "split.json").read_text())
    assert split["val_from"] == "train" and len(split["val_indices"]) == round(64 * 0.1)
    assert split["test_from"] == {"dev": "dev.tsv"} and split["tokenizer"]["name"] == "byte"
    metrics = read_metrics(tmp_path / task)
    assert len(metrics) == 3 and f"val_{headline}" in metrics[0]
    if task != "stsb":
        assert metrics[-1]["val_loss"] < metrics[0]["val_loss"] or metrics[-1][f"val_{headline}"] >= 90


@pytest.mark.slow
def test_glue_fine_tune_starts_from_a_pretraining_runs_encoder(mlm_run, glue_root, tmp_path):
    """model.checkpoint_path=<an MLM run's folder>: the classifier's encoder is that run's best.pt, its head new."""
    _, mlm_dir, _ = mlm_run
    built = build_run(compose(glue(glue_root, "cola", f"model.checkpoint_path={mlm_dir}")), resume=False)
    best = torch.load(mlm_dir / "checkpoints" / "best.pt", weights_only=True)["model"]
    encoder = {k: v for k, v in built.model.state_dict().items() if k.startswith("bert.") and "pooler" not in k}
    assert encoder and all(torch.equal(v, best[k]) for k, v in encoder.items())
    summary = run(compose(glue(glue_root, "cola", f"model.checkpoint_path={mlm_dir}")), tmp_path / "ft")
    assert summary["status"] == "completed" and "mcc" in summary["test"]
    with pytest.raises(ConfigError, match="is not a finished masked-LM run"):
        build_run(compose(glue(glue_root, "cola", f"model.checkpoint_path={tmp_path / 'ft'}")), resume=False)


# --- refusals -------------------------------------------------------------------------------------------------------


def _bad_columns(root):
    bad = root / "bad"
    (bad / "MRPC").mkdir(parents=True)
    for split in ("train", "dev"):
        (bad / "MRPC" / f"{split}.tsv").write_text("label\tsentence_a\tsentence_b\n1\ta\tb\n")
    return bad


@pytest.mark.parametrize(
    "case, refusal",
    [
        ("unknown_task", "dataset.task=colla must be one of cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli"),
        ("missing_folder", r"lacks train.tsv, dev.tsv \(GLUE's RTE folder holds train.tsv, dev.tsv\)"),
        ("bad_columns", "header .* lacks #1 String, #2 String, Quality, which MRPC needs"),
        ("decoder_glue", "model=gpt_micro is a decoder .* dataset=glue fine-tunes an encoder"),
        ("encoder_images", "model=bert_micro is a BERT encoder, which pretrains on text"),
        ("seq_len", "dataset.seq_len=129 is beyond model=bert_micro's 128 positions"),
        ("lora", "lora.rank=8: adapters are not wired for BERT encoders"),
        ("vocab", "model.vocab_size=256 is smaller than the 256 ids of dataset.tokenizer=byte and BERT's 4"),
    ],
)
def test_bad_input_is_refused_in_one_sentence_before_any_work(case, refusal, glue_root, tmp_path):
    overrides = {
        "unknown_task": glue(glue_root, "colla"),
        "missing_folder": glue(glue_root, "rte"),
        "bad_columns": glue(_bad_columns(tmp_path), "mrpc"),
        "decoder_glue": glue(glue_root, "cola", "model=gpt_micro"),
        "encoder_images": ["model=bert_micro"],
        "seq_len": ["model=bert_micro", "dataset=shakespeare", "dataset.seq_len=129"],
        "lora": ["model=bert_micro", "dataset=shakespeare", "lora.rank=8"],
        "vocab": ["model=bert_micro", "dataset=shakespeare", "model.vocab_size=256"],
    }[case]
    if case == "decoder_glue":
        overrides = [o for o in overrides if not o.startswith(("model=bert", "model.dropout"))]
    with pytest.raises(ConfigError, match=refusal) as err:
        run(compose(overrides), tmp_path / "r")
    message = str(err.value)
    assert "\n" not in message and message.endswith("."), message
    summary = read_summary(tmp_path / "r")
    assert summary["status"] == "failed" and summary["error"]["reason"] == "config"
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_a_decoder_is_never_started_from_an_encoder(mlm_run, tmp_path, cache):
    """model=gpt_micro from a masked-LM run's folder, or from a BERT save_pretrained folder: refused, one sentence."""
    from stackwise_bench.nn.bert import build_named_bert

    _, mlm_dir, _ = mlm_run
    folder = tmp_path / "bert_folder"
    build_named_bert("bert_micro", vocab_size=260, pad_token_id=256).save_pretrained(folder)
    for source in (mlm_dir, folder):
        overrides = [o.replace("model=bert_micro", "model=gpt_micro") for o in mlm(cache) if "dropout" not in o]
        with pytest.raises(ConfigError, match="holds a BERT encoder, which has no causal language-model head") as err:
            run(compose([*overrides, f"model.checkpoint_path={source}"]), tmp_path / source.name)
        assert "\n" not in str(err.value)


@pytest.mark.slow
def test_refusal_on_the_command_line_is_one_line_and_leaves_no_folder(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    args = ["model=gpt_micro", "dataset=glue", f"dataset.root={tmp_path}"]
    out = subprocess.run(
        [sys.executable, "-m", "stackwise_bench.train", *args], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert out.returncode == 2, out.stderr[-3000:]
    lines = (out.stdout + out.stderr).splitlines()
    assert len(lines) == 1 and "dataset=glue fine-tunes an encoder's classifier" in lines[0], lines
    assert list(tmp_path.iterdir()) == []


# --- the QUICK study: experiment=bert_depth_time, then experiment=bert_depth_time_glue from its runs ----------------


def quick_arrays(cwd) -> dict[str, list[str]]:
    """The QUICK branch of scripts/bert_depth_time.sh run by bash up to its launches (it generates the synthetic
    GLUE-layout task under ``cwd``): its pretraining and fine-tuning overrides, the model and the task's folder."""
    text = (ROOT / "scripts" / "bert_depth_time.sh").read_text()
    head = text[: text.index("status=0")]
    show = (
        'printf "%s\\n" "${pretrain[@]}"; echo ---; printf "%s\\n" "${finetune[@]}"; echo ---; echo "$model $glue_root"'
    )
    env = dict(os.environ, QUICK="1", PYTHONPATH=str(ROOT))
    out = subprocess.run(["bash", "-c", head + show], cwd=cwd, capture_output=True, text=True, env=env, check=True)
    pretrain, finetune, last = out.stdout.strip().split("---\n")
    model, root = last.split()
    return {"pretrain": pretrain.split(), "finetune": finetune.split(), "model": model, "root": str(cwd / root)}


@pytest.mark.slow
def test_quick_study_pretrains_an_arm_and_fine_tunes_its_seed_on_the_synthetic_task(tmp_path):
    quick = quick_arrays(tmp_path)
    assert quick["model"] == "bert_micro" and "synthetic" in quick["root"]
    assert "Not GLUE" in (tmp_path / "multirun" / "synthetic_glue" / "SYNTHETIC.md").read_text()
    study = tmp_path / "multirun" / "q_depth_time"
    for seed in (1, 2):
        overrides = ["experiment=bert_depth_time", "regime=depth_time", f"seed={seed}", *quick["pretrain"]]
        pre = run(compose(overrides, tiny=False), study / f"seed={seed}", overrides=overrides)
        assert pre["status"] == "completed" and pre["task"]["name"] == "masked_lm"
    assert [r["depth"] for r in read_metrics(study / "seed=2")] == [1, 1, 1, 2, 2, 2]
    overrides = [
        "experiment=bert_depth_time_glue",
        f"model={quick['model']}",
        f"dataset.root={quick['root']}",
        f"model.checkpoint_path={study}",
        *quick["finetune"],
        "trainer.max_epochs=1",
    ]
    summary = run(compose([*overrides, "seed=2"], tiny=False), tmp_path / "ft")
    assert summary["status"] == "completed" and summary["task"]["glue_task"] == "sst2"
    assert summary["pretrained"]["regime"] == "depth_time" and "seed" not in summary["pretrained"]
    assert summary["params"]["depth"] == 2 and 0 <= summary["test"]["acc"] <= 100
    from stackwise_bench.analysis.read.collect import collect_runs, override_keys

    runs = collect_runs(tmp_path / "ft")  # the pretraining arm is a column the analysis groups by and compares
    assert runs["pretrained.regime"].tolist() == ["depth_time"] and "pretrained.regime" in override_keys(runs)
    with pytest.raises(ConfigError, match="is a study folder with 0 runs of seed=3"):
        build_run(compose([*overrides, "seed=3"], tiny=False), resume=False)
