"""Every config knob's type and range, checked before anything is built.

Three tables map a dotted key to a :class:`Spec` (a type, a range or a set of choices, whether null is allowed,
and a valid example for the refusal): :data:`KNOBS` for the training config (``conf/config.yaml`` and every group
under ``conf/``), :data:`EVALUATE_KNOBS` for ``python -m stackwise_bench.evaluate key=value`` (``conf/evaluate.yaml``)
and :data:`EVALUATE_STUDY_KNOBS` for evaluation studies (``conf/evaluate_study.yaml``). A key is checked only where
the composed config has it, so one table serves every option of a group (``model.patch_size`` exists for
``model=vit_micro_p4`` only). Knobs whose valid values are open-ended are in :data:`EXEMPT`, each with its reason;
``tests/test_knobs.py`` asserts that every leaf key of every option of every group is in one of the two.

Relations between keys (digits' 8x8 minimum, heads that divide the width, warmup within the epochs) are
:data:`RULES`: small functions that run once every key has passed its own check (the evaluation configs have one:
``activations``/``keep_head`` only apply with ``quantize``, ``activations`` only with an FP8 one,
``group_size`` only with ``quantize=int4``).

Each refusal is one :class:`~stackwise_bench.errors.ConfigError` sentence naming the key and its value, what was
wrong and a valid example. Torch-free on purpose (this package sits in the lowest layer with ``configs`` and ``cli``):
what needs torch, the data or the device (a CIFAR root without the files, a timm name that does not exist, a
precision this GPU cannot run, a LoRA target the model lacks) is refused by the module that builds it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from stackwise_bench.errors import ConfigError
from stackwise_bench.knobs.keys import unknown_key
from stackwise_bench.knobs.rules import ABSENT, GROUP_SIZE_DEFAULT, INT_FORMATS, RULES, Get, Rule, _quantized_only
from stackwise_bench.knobs.specs import (
    Bool,
    Choice,
    File,
    FolderName,
    Int,
    ListOf,
    Names,
    Number,
    Pair,
    Pattern,
    Spec,
    Text,
    show,
)

# ------------------------------------------------------------------------------------ training config

# lora.method (stackwise_bench/nn/peft_methods.py; repeated here: this package imports no torch code)
PEFT_METHOD_NAMES = (
    "lora", "dora", "rslora", "pissa", "adalora", "loha", "lokr", "ia3", "vera", "oft", "qalora", "qlora",
)  # fmt: skip
SEED = Int("42", min=0, max=2**64 - 1, what="a non-negative integer below 2**64")
FP8_FORMATS = ("fp8_e4m3", "fp8_e5m2")
PTQ_FORMATS = (*FP8_FORMATS, *INT_FORMATS)  # evaluate's quantize=
# evaluate's zero_shot.task= (stackwise_bench/lm_zero_shot.py's TASKS and runs/contract.py's ZERO_SHOT_METRICS;
# repeated here: this package imports neither; tests/test_zero_shot_evaluate.py checks that the three agree)
ZERO_SHOT_TASKS = ("lambada", "hellaswag", "piqa")

KNOBS: dict[str, Spec] = {
    # conf/config.yaml
    "seed": SEED,
    "plan": Bool("true"),
    "study": FolderName("peft_baseline", note="a sweep writes into multirun/<study>"),
    "lease.on_busy": Choice(("skip", "wait"), "wait"),
    "lease.timeout_s": Number("120", lo=0, lo_open=True, note="a stale lease is taken over after it"),
    # conf/model/*.yaml
    "model.name": Text("resnet8", what="a model name (resnet8, resnet14, an alias or any timm name)"),
    "model.pretrained": Bool("false"),
    "model.checkpoint_path": File(
        "null", folder=True, null=True, note="a local weights file, or a language model's save_pretrained folder"
    ),
    "model.img_size": Int("32", min=1),
    "model.drop_path_rate": Number("0.1", lo=0, hi=1, hi_open=True, note="0 = off"),
    "model.patch_size": Int("4", min=1),  # the timm ViT keys of model=vit_micro_p4
    "model.embed_dim": Int("64", min=1),
    "model.depth": Int("2", min=1),
    "model.num_heads": Int("2", min=1),
    "model.mlp_ratio": Number("2.0", lo=0, lo_open=True),
    # timm's VisionTransformer options (1.0.x; an older timm refuses the ones it lacks when it builds)
    "model.global_pool": Choice(("", "avg", "avgmax", "max", "token", "map", "prr"), "avg"),
    "model.class_token": Bool("false"),
    "model.weight_init": Choice(("", "skip", "reset", "jax", "jax_nlhb", "moco"), "jax"),
    # conf/model/{gpt_*,llama_*}.yaml: causal language models (stackwise_bench/nn/causal_lm.py)
    "model.family": Choice(("gpt2", "llama"), "gpt2"),
    "model.nanogpt": Bool("false"),
    "model.n_layer": Int("4", min=1),
    "model.n_embd": Int("128", min=1),
    "model.n_head": Int("4", min=1),
    "model.context": Int("64", min=1, note="the longest window; dataset.seq_len at most this"),
    "model.vocab_size": Int("256", min=2, null=True, note="null = the tokenizer's"),
    "model.dropout": Number("0.0", lo=0, hi=1, hi_open=True, note="0 = off"),
    # conf/model/bert_*.yaml: BERT encoders (stackwise_bench/nn/bert.py; n_layer, n_head, vocab_size above)
    "model.hidden": Int("64", min=1, note="the encoder's width"),
    "model.intermediate": Int("256", min=1, note="the feed-forward width, 4 x hidden in BERT"),
    "model.max_positions": Int("128", min=2, note="learned positions; dataset.seq_len at most this"),
    # conf/augmentation/*.yaml
    "augmentation.crop_padding": Int("4", min=0, note="0 = no crop"),
    "augmentation.flip": Bool("true"),
    "augmentation.color_jitter": Number("0.4", lo=0, hi=1, hi_open=True, note="0 = off"),
    "augmentation.rotation_deg": Number("15", lo=0, hi=180, note="0 = off"),
    "augmentation.erasing_p": Number("0.25", lo=0, hi=1, what="a probability in [0, 1]", note="0 = off"),
    "augmentation.erasing_scale": Pair(
        "[0.02,0.33]",
        Number("", lo=0, hi=1, lo_open=True),
        ordered=True,
        what="two area fractions [lo, hi] with 0 < lo <= hi <= 1",
    ),
    "augmentation.auto_augment": Choice(("rand", "trivial"), "rand", null=True, note="null = off"),
    "augmentation.randaug_n": Int("2", min=1, null=True, note="null = 2"),
    "augmentation.randaug_m": Number("9", lo=0, hi=10, null=True, note="timm's 0-10 scale, null = 9"),
    "augmentation.randaug_std": Number("0.5", lo=0, null=True, note="null = 0"),
    "augmentation.randaug_p": Number("0.5", lo=0, hi=1, null=True, what="a probability in [0, 1]", note="null = 1"),
    "augmentation.mixup_alpha": Number("0.8", lo=0, null=True, note="0 and null = off"),
    "augmentation.cutmix_alpha": Number("1.0", lo=0, null=True, note="0 and null = off"),
    "augmentation.mix_prob": Number("1.0", lo=0, hi=1, null=True, what="a probability in [0, 1]", note="null = 1"),
    "augmentation.switch_prob": Number("0.5", lo=0, hi=1, null=True, what="a probability in [0, 1]", note="null = 0.5"),
    # conf/dataset/*.yaml
    "dataset.name": Choice(("cifar10", "cifar100"), "cifar10"),
    "dataset.root": Text("data", null=True, what="a folder path"),  # null: imagefolder's unset default (refused)
    "dataset.download": Bool("false"),
    "dataset.check_integrity": Bool("true"),
    "dataset.val_fraction": Number(
        "0.1", lo=0, hi=1, lo_open=True, hi_open=True, note="best.pt and early stopping are chosen on it"
    ),
    "dataset.split_seed": Int("0", min=0),
    "dataset.img_size": Int("32", min=1),
    "dataset.test_fraction": Number("0.2", lo=0, hi=1, lo_open=True, hi_open=True),
    "dataset.train_size": Int("500", min=1, null=True, note="null = every training image"),
    "dataset.num_train": Int("512", min=1),
    "dataset.num_test": Int("128", min=1),
    "dataset.num_classes": Int("4", min=2),
    "dataset.seed": Int("0", min=0),
    "dataset.cache_dir": Text(
        "/scratch/stackwise_cache", null=True, what="a folder path", note="null = <root>/.stackwise_cache"
    ),
    "dataset.skip_bad": Bool("false"),
    "dataset.workers": Int("8", min=1, null=True, note="null = the CPUs this process may use"),
    # conf/dataset/{shakespeare,text}.yaml: text for causal language models (stackwise_bench/data/text/dataset.py)
    "dataset.corpus": Choice(("shakespeare", "text", "wikitext103"), "shakespeare"),
    "dataset.tokenizer": Choice(("byte", "gpt2", "bpe"), "byte"),
    "dataset.bpe_vocab_size": Int("4096", min=257, note="tokenizer=bpe only"),
    "dataset.tokenizer_files": Text("gpt2_files", null=True, what="a folder path", note="null = the wheel's"),
    "dataset.seq_len": Int("64", min=1, note="at most model.context"),
    "dataset.steps_per_epoch": Int("100", min=1, note="training steps between two validations"),
    "dataset.val_tokens": Int("65536", min=2, null=True, note="null = the whole validation split"),
    "dataset.test_tokens": Int("65536", min=2, null=True, note="null = the whole test split"),
    "dataset.train_tokens": Int("1000000", min=1, null=True, note="null = train by trainer.max_epochs"),
    # conf/dataset/glue.yaml: one GLUE task (stackwise_bench/data/text/glue_data.py)
    "dataset.task": Choice(
        ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"), "cola", note="GLUE's tasks"
    ),
    "dataset.plays": Choice(("all", "pretrain", "finetune"), "all", note="shakespeare: two fixed disjoint halves"),
    # conf/regime/*.yaml (DepthTime checks its own lists: lengths and order depend on each other)
    "regime.stacks": ListOf(
        "[1,2]", Int("1", min=1), increasing=True, null=True, note="null = halved back from the model's depth"
    ),
    "regime.boundaries": ListOf(
        "[0.5]",
        Number("0.5", lo=0, hi=1, lo_open=True, hi_open=True),
        increasing=True,
        null=True,
        note="null = equal shares per stage",
    ),
    "regime.match": Bool("true"),
    "regime.building_mode": Choice(("append", "prepend", "interleave"), "append"),
    "regime.init": Choice(("copy", "identity", "random"), "copy"),
    "regime.scope": Choice(("rackwise", "stackwise"), "stackwise"),
    "regime.old_lr_factor": Number("0.1", lo=0, hi=1, note="0 freezes the older blocks"),
    "regime.optimizer_state": Choice(("copy", "reset"), "copy"),
    "regime.lr_rewarm_steps": Int("100", min=0),
    "regime.seed": Int("0"),
    # conf/precision/*.yaml
    "precision.name": Choice(("fp32", "fp16", "bf16", "fp8"), "bf16"),
    # conf/optimizer/*.yaml
    "optimizer.name": Choice(("adamw", "sgd"), "adamw"),
    "optimizer.lr": Number("1e-3", lo=0, lo_open=True),
    "optimizer.weight_decay": Number("0.05", lo=0, note="0 = off"),
    "optimizer.betas": Pair(
        "[0.9,0.999]", Number("", lo=0, hi=1, hi_open=True), what="two numbers in [0, 1) (AdamW's beta1, beta2)"
    ),
    "optimizer.eps": Number("1e-8", lo=0, lo_open=True),
    "optimizer.momentum": Number("0.9", lo=0, hi=1, hi_open=True, note="0 = plain SGD"),
    "optimizer.nesterov": Bool("true"),
    "optimizer.implementation": Choice(("auto", "fused", "foreach", "loop"), "auto"),
    "optimizer.layer_decay": Number("0.75", lo=0, hi=1, lo_open=True, null=True, note="null = off"),
    # conf/scheduler/*.yaml
    "scheduler.name": Choice(("cosine", "constant"), "cosine"),
    "scheduler.warmup_epochs": Number("1", lo=0, note="fractions of an epoch are fine, 0 = no warmup"),
    "scheduler.min_lr_ratio": Number("0.0", lo=0, hi=1, note="the last step's learning rate over optimizer.lr"),
    # conf/lora/*.yaml
    "lora.rank": Int("8", min=0, note="0 = full fine-tuning"),
    "lora.alpha": Number("16", lo=0, lo_open=True, null=True, note="null = 2 * rank"),
    "lora.dropout": Number("0.1", lo=0, hi=1, hi_open=True),
    "lora.method": Choice(PEFT_METHOD_NAMES, "dora"),
    "lora.target_modules": Names(
        "[qkv]", null=True, what="a regex or a non-empty list of module names", note="null = the model family's own"
    ),
    "lora.head": Text("head", null=True, what="a module name", note="null freezes the head"),
    "lora.pissa.niter": Int("4", min=1, null=True, note="null = an exact SVD"),
    "lora.adalora.init_r": Int("12", min=1, null=True, note="null = ceil(1.5 * rank)"),
    "lora.adalora.tinit": Int("100", min=0, null=True, note="null = 10% of the steps"),
    "lora.adalora.tfinal": Int("200", min=0, null=True, note="null = 20% of the steps"),
    "lora.adalora.delta_t": Int("10", min=1),
    "lora.adalora.beta1": Number("0.85", lo=0, hi=1, lo_open=True, hi_open=True),
    "lora.adalora.beta2": Number("0.85", lo=0, hi=1, lo_open=True, hi_open=True),
    "lora.adalora.orth_reg_weight": Number("0.5", lo=0, note="0 = no orthogonality penalty"),
    "lora.loha.rank_dropout": Number("0.0", lo=0, hi=1, hi_open=True),
    "lora.loha.module_dropout": Number("0.0", lo=0, hi=1, hi_open=True),
    "lora.lokr.decompose_both": Bool("false"),
    "lora.lokr.factor": Int("-1", min=-1, note="-1 = the most balanced factorisation"),
    "lora.lokr.rank_dropout": Number("0.0", lo=0, hi=1, hi_open=True),
    "lora.lokr.module_dropout": Number("0.0", lo=0, hi=1, hi_open=True),
    "lora.vera.d_initial": Number("0.1", lo=0, lo_open=True),
    "lora.vera.projection_seed": Int("0", min=0),
    "lora.oft.block_size": Int("8", min=2),
    "lora.oft.coft": Bool("false"),
    "lora.oft.eps": Number("6e-5", lo=0, lo_open=True),
    "lora.oft.module_dropout": Number("0.0", lo=0, hi=1, hi_open=True),
    "lora.qalora.bits": Choice((4, 8), "4"),
    "lora.qalora.group_size": Int("32", min=1),
    "lora.qlora.bits": Choice((4, 8), "4"),
    "lora.qlora.group_size": Int("32", min=1),
    # conf/trainer/*.yaml
    "trainer.max_epochs": Int("20", min=1),
    "trainer.batch_size": Int("64", min=1),
    "trainer.accumulate": Int("2", min=1, note="micro-batches per step; at most trainer.batch_size"),
    "trainer.max_flops": Number("1e12", lo=0, lo_open=True, null=True, note="null = train by trainer.max_epochs"),
    "trainer.eval_batch_size": Int("256", min=1, null=True, note="null = 512 on a GPU, the training batch on a CPU"),
    "trainer.grad_clip": Number("1.0", lo=0, null=True, note="0 and null disable clipping"),
    "trainer.early_stopping_patience": Int("5", min=0, null=True, note="0 and null disable early stopping"),
    "trainer.eval_every": Int("1", min=1),
    "trainer.label_smoothing": Number("0.1", lo=0, hi=1, hi_open=True, note="0 = off"),
    "trainer.device": Pattern(r"auto|cpu|cuda(:\d+)?", "cpu", what="auto, cpu, cuda or cuda:N"),
    "trainer.deterministic": Bool("true"),
    "trainer.resume": Bool("true"),
    "trainer.channels_last": Bool("true"),
    "trainer.data_on_device": Bool("true"),
    "trainer.compile": Bool("false"),
    "trainer.threads": Int("1", min=1, null=True, note="null keeps torch's default"),
    "trainer.devices": Int("2", min=1, note="ranks of one run: GPUs, or CPU processes over gloo"),
    "trainer.strategy": Choice(("ddp", "fsdp"), "ddp", null=True, note="null = ddp"),
    "trainer.progress": Choice(("auto", "bar", "log"), "log"),
    "trainer.log_every_n_steps": Int("20", min=1),
    "trainer.ema": Number("0.999", lo=0, hi=1, lo_open=True, hi_open=True, null=True, note="null = off"),
    "trainer.ema_warmup_power": Number("0.75", lo=0, lo_open=True, null=True, note="null = no warmup"),
    "trainer.best_weights": Choice(("raw", "ema"), "raw", null=True, note="null = raw"),
    # conf/monitors/*.yaml
    "monitors.hardware.interval_s": Number("1.0", lo=0, lo_open=True),
    "monitors.hardware.gpu": Bool("true"),
    "monitors.hardware.power": Bool("true"),
    "monitors.hardware.thermal": Bool("true"),
    # conf/diagnostics/*.yaml
    "diagnostics.every_n_steps": Int("50", min=1, note="a logging step every N optimizer steps"),
    "diagnostics.layer_grads": Bool("true"),
    "diagnostics.weights": Bool("false"),
    "diagnostics.activations": Bool("false"),
    # conf/logger/*.yaml (logger=[tensorboard,mlflow,trackio,wandb])
    "logger.tensorboard.subdir": FolderName("tensorboard", note="the event files' folder inside the run folder"),
    "logger.tensorboard.flush_secs": Number("30", lo=0, lo_open=True),
    "logger.mlflow.tracking_uri": Text(
        "sqlite:///mlflow.db", null=True, what="an MLflow tracking URI", note="null = the study's own SQLite store"
    ),
    "logger.trackio.flush_secs": Number("5", lo=0, lo_open=True),
    "logger.wandb.mode": Choice(("offline", "online", "disabled"), "offline"),
    "logger.wandb.project": Text("my-study", null=True, what="a wandb project name", note="null = the study's name"),
}

# Leaf keys left unchecked here, and why; every other leaf of every option of every group must be in KNOBS.
EXEMPT: dict[str, str] = {
    f"{path}._target_": "an import path Hydra instantiates (open-ended); Hydra refuses one that does not import"
    for path in (
        "model",
        "dataset",
        "augmentation",
        "optimizer",
        "scheduler",
        "trainer",
        "monitors.hardware",
        "diagnostics",
        "regime",
    )
}

TRACKERS = ("tensorboard", "mlflow", "trackio", "wandb")
EXEMPT.update({f"logger.{name}._target_": EXEMPT["model._target_"] for name in TRACKERS})
EXEMPT.update({f"logger.{name}.name": "the tracker's key in summary.json['loggers']: any text" for name in TRACKERS})

# Config groups every training run builds from: deleting one (~model, model=null) is refused by name.
GROUPS: dict[str, str] = {
    "model": "pick an option, e.g. model=resnet8",
    "dataset": "pick an option, e.g. dataset=digits",
    "augmentation": "use augmentation=none for no augmentation",
    "precision": "pick an option, e.g. precision=fp32",
    "optimizer": "pick an option, e.g. optimizer=adamw",
    "scheduler": "use scheduler=constant for a constant learning rate",
    "lora": "use lora=default (lora.rank=0 is full fine-tuning)",
    "trainer": "pick an option, e.g. trainer=default",
    "monitors": "use monitors=none for no monitors",
}


def _groups_present(get: Get) -> str | None:
    for group, advice in GROUPS.items():
        value = get(group, plain=False)  # the node's own type: its values are the keys' to check
        if not isinstance(value, Mapping):
            how = "" if value is ABSENT else f"={show(value)}"
            return f"{group}{how} leaves the run without its {group} config; {advice}."
    return None


def _root_given(get: Get) -> str | None:
    """``dataset.root=null`` is dataset=imagefolder's default (its loader asks for the folder); elsewhere a mistake."""
    if get("dataset.root") is None and get("dataset._target_") != "stackwise_bench.data.load_imagefolder":
        name = get("dataset.name")
        where = f" for dataset={name}" if isinstance(name, str) else ""
        return f"dataset.root=null must be a folder path{where}; use e.g. dataset.root=data."
    return None


# ---------------------------------------------------------------------------------- evaluation configs

# conf/evaluate.yaml: `python -m stackwise_bench.evaluate key=value ...`
EVALUATE_KNOBS: dict[str, Spec] = {
    "checkpoint": Text("multirun/AugmFP16/seed=42", what="a run folder or a .pt file inside one"),
    "quantize": Choice(PTQ_FORMATS, "fp8_e4m3", null=True, note="null = the weights as trained"),
    "group_size": Int(str(GROUP_SIZE_DEFAULT), min=1, note="int4 weights per scale and zero point"),
    "keep_head": Bool("true"),
    "activations": Bool("false"),
    "name": FolderName("fp8_test", null=True, note="the folder under <run>/eval/"),
    "device": Pattern(r"auto|cpu|cuda(:\d+)?", "cpu", null=True, what="auto, cpu, cuda or cuda:N"),
    "dataset.root": Text("data", null=True, what="a folder path", note="null keeps the run's own"),
    "dataset.download": Bool("false", null=True, note="null keeps the run's own"),
    # language-model runs only (stackwise_bench/lm_evaluation.py); _generation_only below
    "generate": Bool("true"),
    "prompt": Text('"ROMEO:"', null=True, what="non-empty text", note="null = a new line"),
    "max_new_tokens": Int("200", min=1),
    "temperature": Number("0.8", lo=0, note="0 = greedy"),
    "top_k": Int("200", min=1, null=True, note="null = every token"),
    "seed": SEED,
    "samples": Int("1", min=1, max=1000),
    "export": Text("exports/gpt_mini", null=True, what="a folder path", note="null = no export"),
    # language-model runs only: a zero-shot task (stackwise_bench/lm_zero_shot.py); _zero_shot_only below
    "zero_shot.task": Choice(ZERO_SHOT_TASKS, "lambada", null=True, note="null = the test split's pass"),
    "zero_shot.path": Text("data/lambada_test.jsonl", null=True, what="the task's released jsonl file"),
    "zero_shot.labels": Text("data/valid-labels.lst", null=True, what="PIQA's labels file", note="null = rows'"),
}

# conf/evaluate_study.yaml: `python -m stackwise_bench.evaluate --multirun experiment=FP8Test`
EVALUATE_STUDY_KNOBS: dict[str, Spec] = {
    "study": KNOBS["study"],
    "plan": KNOBS["plan"],
    "evaluate.runs": Text("multirun/AugmFP16", what="the folder of the study whose runs are evaluated"),
    "evaluate.checkpoint": Choice(("best", "last"), "best", note="each run's checkpoints/<checkpoint>.pt"),
    "evaluate.quantize": Choice(PTQ_FORMATS, "fp8_e4m3", null=True, note="null = the weights as trained"),
    "evaluate.group_size": Int(str(GROUP_SIZE_DEFAULT), min=1, note="int4 weights per scale and zero point"),
    "evaluate.keep_head": Bool("true"),
    "evaluate.activations": Bool("false"),
    "evaluate.zero_shot.task": Choice(ZERO_SHOT_TASKS, "lambada", null=True, note="null = no zero-shot task"),
    "evaluate.zero_shot.path": Text("data/lambada_test.jsonl", null=True, what="the task's released jsonl file"),
    "evaluate.zero_shot.labels": Text("data/valid-labels.lst", null=True, what="PIQA's labels file"),
}


# ---------------------------------------------------------------------------------------------- checks


def check_config(cfg: DictConfig | Mapping) -> None:
    """Raise ConfigError with one sentence for the first training knob out of its type or range.

    Checks that the :data:`GROUPS` are there and that every key is one of theirs (a ``+`` typo), every key of
    :data:`KNOBS` the config has, then the :data:`RULES` between keys. ``hydra.*`` is not looked at (Hydra's own),
    nor an evaluation preset's ``evaluate`` node (``train`` refuses those by name).
    """
    targets = {k for k in EXEMPT if k.endswith("._target_")}

    def no_typo(get: Get) -> str | None:
        return unknown_key(cfg, {**KNOBS, **EXEMPT}, targets, skip=("hydra", "evaluate"))

    _check(cfg, KNOBS, before=[_groups_present, no_typo], after=[*RULES, _root_given])


def check_evaluate_config(args: DictConfig | Mapping) -> None:
    """The ``evaluate`` command line's arguments over ``conf/evaluate.yaml``: one sentence for the first bad one."""
    _check(args, EVALUATE_KNOBS, after=[_quantized_only(""), _generation_only, _zero_shot_only("")])


# conf/evaluate.yaml's sampling knobs: what they are without generate=true (a value other than the default is refused)
GENERATION_DEFAULTS = {"prompt": None, "max_new_tokens": 200, "temperature": 0.8, "top_k": 200, "seed": 1337}


def _zero_shot_only(prefix: str) -> Rule:
    """``zero_shot.path`` with ``zero_shot.task`` and the other way round; ``zero_shot.labels`` with PIQA only."""

    def rule(get: Get) -> str | None:
        task, path, labels = (get(f"{prefix}zero_shot.{k}") for k in ("task", "path", "labels"))
        task, path, labels = (None if v is ABSENT else v for v in (task, path, labels))
        if task is not None and path is None:
            return (
                f"{prefix}zero_shot.task={task} needs the task's file: add {prefix}zero_shot.path=<its released jsonl>."
            )
        if task is None and (path is not None or labels is not None):
            return (
                f"{prefix}zero_shot.path and {prefix}zero_shot.labels name a zero-shot task's files; add "
                f"{prefix}zero_shot.task=lambada (or hellaswag, piqa), or drop them."
            )
        if labels is not None and task != "piqa":
            return f"{prefix}zero_shot.labels={labels} is PIQA's labels file; drop it for zero_shot.task={task}."
        return None

    return rule


def _generation_only(get: Get) -> str | None:
    """The sampling knobs only with ``generate=true``; greedy decoding (``temperature=0``) gives one text."""
    if get("generate") is not True:
        for key, default in {**GENERATION_DEFAULTS, "samples": 1}.items():
            value = get(key)
            if value is not ABSENT and value != default:
                return f"{key}={show(value)} only applies to generate=true; add generate=true, or drop {key}."
        return None
    samples = get("samples")
    if get("temperature") == 0 and samples not in (ABSENT, 1):
        return (
            f"samples={show(samples)} with temperature=0: greedy decoding gives one text; use samples=1, or a "
            "temperature above 0 (e.g. temperature=0.8) for several."
        )
    return None


def check_evaluate_study_config(cfg: DictConfig | Mapping) -> None:
    """An evaluation study's config (``conf/evaluate_study.yaml`` + a preset): one sentence for the first bad knob."""

    def no_typo(get: Get) -> str | None:
        return unknown_key(cfg, EVALUATE_STUDY_KNOBS, set())

    after = [_quantized_only("evaluate."), _zero_shot_only("evaluate.")]
    _check(cfg, EVALUATE_STUDY_KNOBS, before=[no_typo], after=after)


def _check(
    cfg: DictConfig | Mapping, table: Mapping[str, Spec], before: Sequence[Rule] = (), after: Sequence[Rule] = ()
) -> None:
    """``before`` rules (the config's shape), then every key of ``table`` the config has, then ``after`` rules."""

    def get(key: str, plain: bool = True):
        return lookup(cfg, key, table[key].example if key in table else "<value>", plain=plain)

    for rule in before:
        if problem := rule(get):
            raise ConfigError(problem)
    for key, spec in table.items():
        value = get(key)
        if value is not ABSENT and (problem := spec.problem(key, value)):
            raise ConfigError(problem)
    for rule in after:  # every key they read has passed its own check
        if problem := rule(get):
            raise ConfigError(problem)


def lookup(cfg: DictConfig | Mapping, key: str, example: str = "<value>", plain: bool = True):
    """The value at dotted ``key`` (interpolations resolved; ``plain``: nodes as dicts/lists), or :data:`ABSENT`.

    Raises:
        ConfigError: the value is ``???`` (never set), or an interpolation in it cannot be resolved.
    """
    try:
        node = cfg
        for part in key.split("."):
            if isinstance(node, DictConfig) and OmegaConf.is_missing(node, part):
                raise ConfigError(f"{key}=??? must be set; use e.g. {key}={example}.")
            if not isinstance(node, (DictConfig, Mapping)) or part not in node:
                return ABSENT
            node = node[part]  # resolves an interpolation
        if plain and isinstance(node, (DictConfig, ListConfig)):
            node = OmegaConf.to_container(node, resolve=True)
    except OmegaConfBaseException as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0].rstrip(".")
        raise ConfigError(f"{key} could not be read ({reason}); set it to a value, e.g. {key}={example}.") from exc
    return node
