"""python -m stackwise_bench.evaluate on a BERT run (a tiny bert_micro masked-LM run, trained here as
tests/test_bert_train.py trains it): generate=true, export=, zero_shot.task= and a plain re-test are each refused in
one sentence, naming the option and what to do, with exit status 2 and nothing left in eval/."""

from __future__ import annotations

import pytest
from test_bert_train import mlm

from stackwise_bench.evaluate import main

from conftest import compose


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory):
    from stackwise_bench.train import run

    run_dir = tmp_path_factory.mktemp("bert_eval") / "mlm"
    summary = run(compose(mlm(tmp_path_factory.mktemp("tokens"), "trainer.max_epochs=1")), run_dir)
    assert summary["status"] == "completed", summary.get("error")
    return run_dir


@pytest.mark.parametrize(
    "options, refusal",
    [
        (["generate=true", "prompt=ROMEO:"], "generate=true samples text from a causal language model"),
        (["zero_shot.task=lambada", "zero_shot.path={lambada}"], "zero_shot.task=lambada scores a causal language"),
        (["export={export}"], "export=.* writes a causal language model's save_pretrained folder"),
        ([], "evaluate does not re-test BERT runs yet"),
        (["quantize=int8"], "evaluate does not re-test BERT runs yet"),
    ],
    ids=["generate", "zero_shot", "export", "plain", "quantize"],
)
def test_an_encoder_run_is_refused_in_one_sentence_before_any_work(bert_run, options, refusal, tmp_path, capsys):
    import re

    lambada = tmp_path / "lambada.jsonl"
    lambada.write_text('{"text": "to be or not to be"}\n')
    argv = [o.format(lambada=lambada, export=tmp_path / "hf") for o in options]
    assert main([f"checkpoint={bert_run}", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and err.endswith("."), err
    assert re.search(refusal, err), err
    assert "model=bert_micro" in err
    assert ("summary.json" if "re-test" in refusal else "drop ") in err
    assert not (bert_run / "eval").exists() and not (tmp_path / "hf").exists()
