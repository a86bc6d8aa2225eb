"""stackwise_bench.knobs covers the config: every leaf key of every option of every group is checked or exempted.

Torch-free and in-process: each option is composed once with ``hydra.compose`` (module fixture) and its leaves
walked. A knob added to a YAML without a spec in ``stackwise_bench/knobs/`` fails :func:`test_every_knob_has_a_spec`;
a spec whose key no config has any more fails :func:`test_no_stale_specs`. The bad values of each knob are refused in
``tests/test_bad_input.py``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from stackwise_bench.errors import ConfigError
from stackwise_bench.knobs import (
    EVALUATE_KNOBS,
    EVALUATE_STUDY_KNOBS,
    EXEMPT,
    KNOBS,
    check_config,
    check_evaluate_config,
    check_evaluate_study_config,
)

from conftest import CONF

SKIP_GROUPS = {"hydra"}  # Hydra's own config (launchers, output folders): not knobs of a run


def leaves(node, prefix: str = ""):
    """Dotted keys of every leaf; a list is one leaf (one knob), an empty mapping has none."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1]


def options(conf: Path) -> list[tuple[str, str]]:
    """(group, option) for every YAML of every config group folder, experiment presets included."""
    return [
        (group.name, f.stem)
        for group in sorted(p for p in conf.iterdir() if p.is_dir() and p.name not in SKIP_GROUPS)
        for f in sorted(group.glob("*.yaml"))
    ]


def compose_options(conf: Path, groups: set[str] | None = None) -> dict[tuple[str, str], tuple[str, object]]:
    """Each option composed on the defaults: ``(group, option) -> (app, cfg)``; app is ``config`` or ``evaluate_study``.

    An experiment preset that carries an ``evaluate`` node is an evaluation-study preset: it is composed under
    ``conf/evaluate_study.yaml``, the app it belongs to. ``(None, None)`` is each app's own defaults.
    """
    composed = {}
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        composed[(None, "config")] = ("config", compose(config_name="config"))
        composed[(None, "evaluate_study")] = ("evaluate_study", compose(config_name="evaluate_study"))
        for group, option in options(conf):
            if groups is not None and group not in groups:
                continue
            cfg = compose(config_name="config", overrides=[f"{group}={option}", *PAIRED.get((group, option), [])])
            app = "config"
            if "evaluate" in cfg:
                app, cfg = "evaluate_study", compose(config_name="evaluate_study", overrides=[f"{group}={option}"])
            composed[(group, option)] = (app, cfg)
    return composed


# Options that only compose into a valid run with a partner: a language model reads text, text needs one.
LM = ("gpt_micro", "gpt_mini", "gpt2_small", "gpt2_medium", "gpt2_large", "llama_micro", "llama_mini")
PAIRED = {("model", m): ["dataset=shakespeare"] for m in LM}
PAIRED |= {("dataset", "shakespeare"): ["model=gpt_micro"], ("dataset", "text"): ["model=gpt_micro", "dataset.root=."]}
PAIRED |= {("dataset", "wikitext103"): ["model=gpt2_small", "dataset.root=."]}
PAIRED |= {("model", m): ["dataset=shakespeare"] for m in ("bert_micro", "bert_tiny", "bert_base", "bert_large")}
PAIRED |= {("dataset", "glue"): ["model=bert_micro", "dataset.root=."]}  # an encoder fine-tunes on a local GLUE
PAIRED |= {("experiment", "bert_depth_time_glue"): ["dataset.root=."]}  # the script names the GLUE folder
PAIRED |= {("experiment", "lm_peft"): ["model.checkpoint_path=null"]}  # its pretrained folder: none before the script

TABLES = {"config": (KNOBS, EXEMPT), "evaluate_study": (EVALUATE_STUDY_KNOBS, {})}


def unspecified(composed) -> list[str]:
    """``group=option: key`` for every leaf that is neither checked nor exempted."""
    out = []
    for (group, option), (app, cfg) in composed.items():
        checked, exempt = TABLES[app]
        for key in leaves(OmegaConf.to_container(cfg, resolve=False)):
            if key not in checked and key not in exempt:
                where = f"{group}={option}" if group else f"conf/{option}.yaml"
                out.append(f"{where}: {key}")
    return sorted(set(out))


@pytest.fixture(scope="module")
def composed():
    return compose_options(CONF)


@pytest.mark.slow
def test_every_knob_has_a_spec(composed):
    missing = unspecified(composed)
    assert not missing, (
        "these config keys have no spec in stackwise_bench/knobs/ (add one to KNOBS, or to EXEMPT with the reason "
        f"they cannot be checked): {missing}"
    )
    raw = OmegaConf.to_container(OmegaConf.load(CONF / "evaluate.yaml"))
    assert sorted(k for k in leaves(raw) if k not in EVALUATE_KNOBS) == []


@pytest.mark.slow
def test_no_stale_specs(composed):
    """Every key of the tables is a key some config has: a renamed or removed knob takes its spec with it."""
    seen = {app: set() for app in TABLES}
    for app, cfg in composed.values():
        seen[app] |= set(leaves(OmegaConf.to_container(cfg, resolve=False)))
    assert sorted(set(KNOBS) - seen["config"]) == []
    assert sorted(set(EXEMPT) - seen["config"]) == []
    assert sorted(set(EVALUATE_STUDY_KNOBS) - seen["evaluate_study"]) == []
    assert set(EXEMPT).isdisjoint(KNOBS)
    assert all(reason.strip() for reason in EXEMPT.values())
    raw = OmegaConf.to_container(OmegaConf.load(CONF / "evaluate.yaml"))
    assert sorted(set(EVALUATE_KNOBS) - set(leaves(raw))) == []


def test_a_new_knob_without_a_spec_fails_the_coverage(tmp_path):
    """The coverage check itself: a copy of conf/ with one new trainer key reports exactly that key."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    with (conf / "trainer" / "default.yaml").open("a") as f:
        f.write("max_wall_hours: null  # a new knob, no spec yet\n")
    assert unspecified(compose_options(conf, groups={"trainer"})) == [
        "conf/config.yaml: trainer.max_wall_hours",
        "trainer=default: trainer.max_wall_hours",
    ]


@pytest.mark.slow
def test_every_option_and_training_preset_passes(composed):
    """What ships is valid: each group option and each experiment preset, on the real defaults."""
    for where, (app, cfg) in composed.items():
        if app == "config":
            check_config(cfg)
        elif where != (None, "evaluate_study"):  # its own defaults leave evaluate.runs to the preset
            check_evaluate_study_config(cfg)


@pytest.mark.slow
def test_every_preset_passes_with_each_option(composed):
    """Presets combined with the options a study sweeps over (the presets' own grids) stay valid."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for overrides in (
            ["experiment=peft_baseline", "model=deit_small", "dataset=cifar100", "lora.rank=32"],
            ["experiment=optimizer_quality", "optimizer=adamw"],
            ["experiment=AugmFP16", "trainer.device=cpu"],
            ["model=vit_micro_p4", "precision=bf16", "lora.rank=4", "dataset=digits"],
        ):
            check_config(compose(config_name="config", overrides=overrides))


def test_evaluation_defaults():
    """conf/evaluate.yaml is valid once checkpoint= is given; evaluate_study.yaml wants evaluate.runs from a preset."""
    defaults = OmegaConf.to_container(OmegaConf.load(CONF / "evaluate.yaml"))
    check_evaluate_config({**defaults, "checkpoint": "multirun/AugmFP16/seed=42"})
    check_evaluate_config({**defaults, "checkpoint": "runs/a", "quantize": "fp8_e5m2", "activations": True})
    with pytest.raises(ConfigError, match=r"^checkpoint=null must be a run folder or a \.pt file inside one; use e\.g"):
        check_evaluate_config(defaults)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        with pytest.raises(ConfigError, match=r"^evaluate\.runs=null must be the folder of the study"):
            check_evaluate_study_config(compose(config_name="evaluate_study"))
        check_evaluate_study_config(compose(config_name="evaluate_study", overrides=["evaluate.runs=multirun/x"]))
