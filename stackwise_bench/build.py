"""Assembly: a composed config becomes objects. The only reader of ``cfg`` besides the apps.

``train`` builds a run with :func:`build_run`; ``evaluate`` rebuilds a trained one
with :func:`rebuild`, from the run's own recorded config, through the same
functions, so it sees the same model, layout and test pixels. Everything built
here takes plain arguments and can be used without Hydra.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, NamedTuple

from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, OmegaConf

from stackwise_bench.errors import ConfigError
from stackwise_bench.knobs.rules import BERT_MODEL

log = logging.getLogger(__name__)

# _target_ module paths of records written before the package had layers: evaluate still rebuilds those runs.
MOVED_MODULES = {
    "stackwise_bench.models.": "stackwise_bench.nn.models.",
    "stackwise_bench.trainer.": "stackwise_bench.training.trainer.",
    "stackwise_bench.optim.": "stackwise_bench.training.optim.",
    "stackwise_bench.monitors.": "stackwise_bench.training.monitors.",
    "stackwise_bench.augment.": "stackwise_bench.data.augment.",
}


class Loaders(NamedTuple):
    train: Any
    val: Any
    test: Any
    num_classes: int


class Assembly(NamedTuple):
    """Everything one training run needs, built and checked before any step."""

    runtime: Any
    trainer: Any
    data: Any
    model: Any
    model_shape: dict
    fp8_layers: list | None
    loaders: Loaders
    optimizer: Any
    scheduler: Any
    monitors: list
    loggers: list
    regime: Any  # training.regime.Classical or DepthTime
    task: Any  # training.tasks.ImageClassification: batches, objective, metrics, throughput unit
    parts: list  # training.parts.StepPart: what joins each step (weight average, AdaLoRA, diagnostics, step rows)
    sections: dict = {}  # more of summary.json as the run starts (a fine-tune's ``pretrained``: its source run's arm)


def instantiate(node, *args, **kwargs):
    """``hydra.utils.instantiate`` that lets our one-sentence ConfigError through unwrapped."""
    try:
        return hydra_instantiate(node, *args, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def build_run(
    cfg: DictConfig, resume: bool, threads: int | None = None, device: str | None = None, group=None
) -> Assembly:
    """Every object of a training run, in dependency order; bad input is refused before any step.

    Args:
        cfg: The composed config.
        resume: Continue from the run folder's ``last.pt`` (the trainer restores it in ``fit``).
        threads, device: A sweep job's share of the machine; they apply only where the config leaves
            ``trainer.threads`` null and ``trainer.device`` auto.
        group: This rank's :class:`~stackwise_bench.training.distributed.Group` on several devices (None: one).
    """
    from stackwise_bench.training.distributed import SINGLE

    group = group or SINGLE
    runtime = build_runtime(cfg, threads=threads, device=group.device or device)
    runtime.apply()  # every rank seeds alike: the model starts with the same weights on each
    trainer = build_trainer(cfg, runtime, resume, group)
    if cfg.model.get("_target_") == BERT_MODEL:  # model=bert_*: masked-LM pretraining on text, or GLUE
        return build_encoder_run(cfg, runtime, trainer, group)
    data = instantiate(cfg.dataset)
    if getattr(data, "kind", "images") == "text":  # dataset=shakespeare, text, wikitext103
        return build_lm_run(cfg, runtime, trainer, data, group)
    if trainer.batch_size > len(data.train_y):
        raise ConfigError(
            f"trainer.batch_size={trainer.batch_size} is larger than the training split of {data.name} "
            f"({len(data.train_y)} images); use trainer.batch_size<={len(data.train_y)}."
        )
    steps = cfg.trainer.max_epochs * (len(data.train_y) // trainer.batch_size)  # AdaLoRA's, until the plan below
    model, shape, fp8_layers = build_model(cfg, data.num_classes, total_steps=steps)
    regime = instantiate(cfg.regime)  # classical, or depth_time: which starts the model at its first stack
    regime.setup(model, cfg.model.name)  # stacks left null: derived from the model's depth (refused if it cannot grow)
    model = model.to(runtime.device)  # Trainer.fit makes convnets (only) channels_last when asked
    loaders = build_loaders(data, instantiate(cfg.augmentation), trainer, cfg.model.img_size, model)
    model = placed(model, group, runtime.seed, trainer, loaders.train.image_shape)
    optimizer = instantiate(cfg.optimizer, model=model)
    task = build_task(cfg, runtime, data, loaders.train.augment)
    total_steps, scheduler = plan_steps(cfg, trainer, model, loaders.train, regime, task, optimizer)
    return Assembly(
        runtime=runtime,
        trainer=trainer,
        data=data,
        model=model,
        model_shape=shape,
        fp8_layers=fp8_layers,
        loaders=loaders,
        optimizer=optimizer,
        scheduler=scheduler,
        monitors=[instantiate(node) for node in cfg.monitors.values()],
        loggers=build_loggers(cfg),
        regime=regime,
        task=task,
        parts=build_parts(cfg, model, total_steps, group),
    )


def build_lm_run(cfg: DictConfig, runtime, trainer, data, group) -> Assembly:
    """A causal language model's run (``model=gpt_micro dataset=shakespeare``): the model sized to the tokenizer,
    refused before any tokenizing when it cannot read the data, then the token windows and the causal-LM task."""
    from stackwise_bench.data.text.dataset import budget_steps, text_loaders
    from stackwise_bench.nn.lm_models import adapt_lm, check_export_tokenizer, check_fits, lm_shape
    from stackwise_bench.training.lm_task import CausalLM, WindowsPart

    vocab = cfg.model.get("vocab_size") or data.vocab_size
    model = instantiate(cfg.model, vocab_size=vocab)
    check_fits(model, cfg.model.name, data.tokenizer.name, data.vocab_size, data.seq_len)
    check_export_tokenizer(cfg.model.get("checkpoint_path"), data.tokenizer.describe())
    shape = lm_shape(model)
    lora = OmegaConf.to_container(cfg.lora, resolve=True)
    model = adapt_lm(model, lora, cfg.trainer.max_epochs * data.steps_per_epoch, cfg.model.name)
    regime = instantiate(cfg.regime)
    regime.setup(model, cfg.model.name)  # depth_time: the model starts at its first stack
    model = model.to(runtime.device)
    train, val, test = text_loaders(data, trainer.batch_size, trainer.eval_batch_size, runtime.seed, runtime.device)
    model = placed(model, group, runtime.seed, trainer, None)
    optimizer = instantiate(cfg.optimizer, model=model)
    task = CausalLM(runtime.autocast, runtime.device)
    trainer.compute.priced_by(task.flops_per_sample, data.seq_len)  # FLOPs per token: 6N + 12·L·H·Q·T
    budget = budget_steps(data.train_tokens, trainer.batch_size, data.seq_len) if data.train_tokens else None
    if budget is not None:
        log.info(
            "dataset.train_tokens=%d: %d steps of %d x %d tokens; trainer.max_epochs=%d is not used",
            data.train_tokens,
            budget,
            trainer.batch_size,
            data.seq_len,
            cfg.trainer.max_epochs,
        )
    total_steps, scheduler = plan_steps(cfg, trainer, model, train, regime, task, optimizer, steps=budget)
    return Assembly(
        runtime=runtime,
        trainer=trainer,
        data=data,
        model=model,
        model_shape=shape,
        fp8_layers=None,
        loaders=Loaders(train, val, test, data.vocab_size),
        optimizer=optimizer,
        scheduler=scheduler,
        monitors=[instantiate(node) for node in cfg.monitors.values()],
        loggers=build_loggers(cfg),
        regime=regime,
        task=task,
        parts=[WindowsPart(train, task), *build_parts(cfg, model, total_steps, group)],  # first: see WindowsPart
    )


def build_encoder_run(cfg: DictConfig, runtime, trainer, group) -> Assembly:
    """A BERT's run; the task follows the dataset: masked-LM pretraining on text (``dataset=shakespeare``, ``text``,
    ``wikitext103``), fine-tuning on one GLUE task (``dataset=glue``). The model is sized to the tokenizer and its 4
    special ids, and refused before any tokenizing when it cannot read the data."""
    from stackwise_bench.nn.bert import check_encoder_fits
    from stackwise_bench.nn.lm_models import lm_shape

    data = instantiate(cfg.dataset)
    glue = getattr(data, "kind", None) == "glue"
    special = special_tokens(data)
    vocab = cfg.model.get("vocab_size") or special.vocab_size
    head = {"head": "classifier", "num_labels": data.num_labels} if glue else {"head": "mlm"}
    path = seed_job(cfg.model.get("checkpoint_path"), cfg.seed)
    pretrained = pretrained_run(path, data.tokenizer.describe())
    if pretrained is not None:  # model.checkpoint_path=<an MLM run's folder>: its best.pt's encoder
        model = encoder_from_run(path, pretrained, head)
    else:
        model = instantiate(cfg.model, vocab_size=vocab, pad_token_id=special.pad, **head)
    check_encoder_fits(model, cfg.model.name, data.tokenizer.name, special.vocab_size, data.seq_len)
    shape = lm_shape(model)
    regime = instantiate(cfg.regime)
    regime.setup(model, cfg.model.name)  # depth_time: the encoder starts at its first stack
    model = model.to(runtime.device)
    if glue:
        train, val, test = data.loaders(trainer.batch_size, trainer.eval_batch_size, runtime.seed, runtime.device)
    else:
        from stackwise_bench.data.text.dataset import text_loaders

        train, val, test = text_loaders(data, trainer.batch_size, trainer.eval_batch_size, runtime.seed, runtime.device)
    model = placed(model, group, runtime.seed, trainer, None)
    optimizer = instantiate(cfg.optimizer, model=model)
    task, first, budget = encoder_task(data, runtime, train, trainer.batch_size)
    trainer.compute.priced_by(task.flops_per_sample, 1 if glue else data.seq_len)
    total_steps, scheduler = plan_steps(cfg, trainer, model, train, regime, task, optimizer, steps=budget)
    return Assembly(
        runtime=runtime,
        trainer=trainer,
        data=data,
        model=model,
        model_shape=shape,
        fp8_layers=None,
        loaders=Loaders(train, val, test, data.num_classes),
        optimizer=optimizer,
        scheduler=scheduler,
        monitors=[instantiate(node) for node in cfg.monitors.values()],
        loggers=build_loggers(cfg),
        regime=regime,
        task=task,
        parts=[*first, *build_parts(cfg, model, total_steps, group)],
        sections={"pretrained": pretrained_arm(pretrained)} if pretrained is not None else {},
    )


def pretrained_arm(summary: dict) -> dict:
    """summary.json's ``pretrained`` section of a fine-tune from a run's folder: the values that run was launched
    with (``regime=depth_time`` ...), but its seed. The analysis reads them as the columns ``pretrained.<key>``, so
    fine-tunes from the arms of a pretraining study fall into one cell per arm (model.checkpoint_path never does)."""
    from stackwise_bench.runs.contract import is_volatile

    arm = {}
    for item in (summary.get("run") or {}).get("overrides") or []:
        key, sep, value = str(item).lstrip("+~").partition("=")
        if sep and key != "seed" and not is_volatile(key) and not key.startswith("hydra"):
            arm[key] = value
    return arm


def special_tokens(data):
    """BERT's [PAD] [CLS] [SEP] [MASK], reserved past the tokenizer's ids (data/text/special_tokens.py)."""
    from stackwise_bench.data.text.special_tokens import special_tokens_for

    return special_tokens_for(data.tokenizer)


def encoder_task(data, runtime, train, batch_size: int) -> tuple:
    """``(task, parts that come first, token-budget steps or None)`` of a BERT run: GLUE's task, or masked LM with
    the training windows' generator in every checkpoint."""
    if getattr(data, "kind", None) == "glue":
        from stackwise_bench.training.glue_task import GlueTask

        return GlueTask(data.task, data.num_labels, runtime.autocast, runtime.device), [], None
    from stackwise_bench.data.text.dataset import budget_steps
    from stackwise_bench.training.mlm_task import MaskedLM, MaskedWindowsPart

    task = MaskedLM(special_tokens(data), runtime.autocast, runtime.device, seed=runtime.seed)
    budget = budget_steps(data.train_tokens, batch_size, data.seq_len) if data.train_tokens else None
    return task, [MaskedWindowsPart(train, task)], budget


def seed_job(path, seed: int):
    """``model.checkpoint_path`` as a run folder: a pretraining *study* folder (job folders below it, no
    ``checkpoints/``) stands for its job of this run's seed, so one sweep over seeds fine-tunes each from its own
    pretraining run (scripts/bert_depth_time.sh). Any other path is returned as it is."""
    if path is None:
        return None
    folder = Path(str(path)).expanduser()
    if not folder.is_dir() or (folder / "checkpoints").is_dir() or (folder / "config.json").is_file():
        return path
    from stackwise_bench.runs.contract import SUMMARY, read_summary

    jobs = [d for d in sorted(folder.iterdir()) if (d / SUMMARY).is_file()]
    same = [d for d in jobs if ((read_summary(d) or {}).get("run") or {}).get("seed") == seed]
    if len(same) != 1:
        raise ConfigError(
            f"model.checkpoint_path={path} is a study folder with {len(same)} runs of seed={seed} (of {len(jobs)}); "
            "point it at one run's folder, or at a study with one run per seed."
        )
    return str(same[0])


def pretrained_run(path, tokenizer: dict) -> dict | None:
    """The summary of the finished masked-LM run that ``model.checkpoint_path`` names (its folder holds
    ``checkpoints/best.pt``), or None for a ``save_pretrained`` folder (loaded as it is) or no path. A run that is not
    a finished masked-LM run, or was trained with another tokenizer, is refused."""
    if path is None or not (Path(str(path)).expanduser() / "checkpoints" / "best.pt").is_file():
        return None
    from stackwise_bench.runs.contract import FINISHED, read_summary

    summary = read_summary(Path(str(path)).expanduser()) or {}
    task = (summary.get("task") or {}).get("name")
    if summary.get("status") not in FINISHED or task != "masked_lm":
        raise ConfigError(
            f"model.checkpoint_path={path} is not a finished masked-LM run (status {summary.get('status')}, task "
            f"{task}); point it at a completed model=bert_* run on text, or at a save_pretrained folder."
        )
    saved = (summary.get("data") or {}).get("tokenizer") or {}
    if saved.get("sha256") != tokenizer.get("sha256"):
        raise ConfigError(
            f"model.checkpoint_path={path} was pretrained with the {saved.get('name')} tokenizer, not this run's "
            f"{tokenizer.get('name')}; set dataset.tokenizer={saved.get('name')}."
        )
    return summary


def encoder_from_run(path, summary: dict, head: dict) -> Any:
    """A BERT with the encoder of a masked-LM run's ``best.pt`` (at its final depth) and a fresh ``head`` (GLUE's
    classifier and pooler: what every fine-tune from a pretrained encoder starts with), or its MLM head as well.
    The shape is read from the weights themselves (a depth-time run's grown depth), the heads from its config."""
    from stackwise_bench.nn.bert import build_named_bert
    from stackwise_bench.nn.state_dict import read_checkpoint

    best = Path(str(path)).expanduser() / "checkpoints" / "best.pt"
    config, special = summary["config"]["model"], summary["task"]["special_tokens"]
    state, _ = read_checkpoint(best, "cpu")
    words = state["bert.embeddings.word_embeddings.weight"]
    shape = {
        "n_layer": len({k.split(".")[3] for k in state if k.startswith("bert.encoder.layer.")}),
        "hidden": words.shape[1],
        "intermediate": state["bert.encoder.layer.0.intermediate.dense.weight"].shape[0],
        "n_head": config.get("n_head"),
    }
    model = build_named_bert(
        config["name"],
        vocab_size=words.shape[0],
        max_positions=state["bert.embeddings.position_embeddings.weight"].shape[0],
        dropout=config.get("dropout", 0.1),
        pad_token_id=special["pad"],
        **head,
        **{k: v for k, v in shape.items() if v is not None},
    )
    if head["head"] == "mlm":
        model.load_state_dict(state)
        return model
    encoder = {k: v for k, v in state.items() if k.startswith("bert.")}
    missing, unexpected = model.load_state_dict(encoder, strict=False)
    if unexpected or any(not k.startswith(("bert.pooler.", "classifier.")) for k in missing):
        raise ConfigError(
            f"model.checkpoint_path={path}: its best.pt does not fit a BERT encoder ({(unexpected or missing)[0]}); "
            "point it at a model=bert_* masked-LM run."
        )
    return model


def placed(model, group, seed: int, trainer, image_shape):
    """The model as this rank trains it (before its optimizer is built): FSDP2 shards its blocks, DDP syncs a
    convnet's BatchNorm statistics across the ranks; ranks > 0 then draw their own dropout masks.

    A sharded model cannot be copied to count its FLOPs: they are counted before (FSDP refuses growth, so the
    architecture never changes after)."""
    if group.size == 1:
        return model
    if group.strategy == "fsdp" and image_shape is not None:
        rate = trainer.compute.per_image(model, image_shape)
        trainer.compute.priced_by(lambda _model, _shape: rate)
    import torch

    from stackwise_bench.nn.growth import block_lists
    from stackwise_bench.training.checkpointing import rank_seed

    if group.strategy == "ddp":  # BatchNorm over the whole batch, as one process does
        if group.backend == "nccl":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:  # torch's needs CUDA kernels
            from stackwise_bench.training.sync_norm import convert

            model = convert(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model = group.prepare(model, block_lists(base)[0] if group.strategy == "fsdp" else [])
    if group.rank:
        torch.manual_seed(rank_seed(seed, group.rank))
    return model


def plan_steps(cfg: DictConfig, trainer, model, train_loader, regime, task, optimizer, steps: int | None = None):
    """The run's steps (epochs x steps, ``steps`` of a token budget, or what ``trainer.max_flops`` buys), the
    regime's growth steps among them, and the LR scheduler spanning them: ``(total_steps, scheduler)``."""
    total_steps = trainer.plan(model, train_loader, regime, task, steps=steps)
    regime.plan(total_steps)  # the steps at which depth_time grows the model
    scheduler = instantiate(
        cfg.scheduler,
        optimizer=optimizer,
        steps_per_epoch=len(train_loader),
        max_epochs=trainer.max_epochs,
        total_steps=total_steps,
    )
    return total_steps, scheduler


def build_task(cfg: DictConfig, runtime, data, augment):
    """What the run learns: image classification (``trainer.label_smoothing``; the training augmentation's batch
    mixing, where ``augment`` has one)."""
    from stackwise_bench.training.tasks import ImageClassification

    return ImageClassification(
        data.num_classes,
        runtime.autocast,
        runtime.device,
        label_smoothing=cfg.trainer.get("label_smoothing", 0.0),
        mixing=getattr(augment, "mixing", None),
        seed=runtime.seed,
    )


def build_parts(cfg: DictConfig, model, total_steps: int, group=None) -> list:
    """The step parts, in the order their rows reach the record: the weight average (``trainer.ema``), AdaLoRA's
    schedule, the diagnostics, the trackers' step rows (:mod:`stackwise_bench.training.parts`)."""
    from stackwise_bench.training.ema import AveragePart
    from stackwise_bench.training.observers import DiagnosticsPart, StepRows

    parts = []
    if cfg.trainer.get("ema") is not None:
        parts.append(
            AveragePart(cfg.trainer.ema, cfg.trainer.get("ema_warmup_power"), cfg.trainer.get("best_weights") == "ema")
        )
    parts.append(build_adapter_schedule(cfg, model, total_steps))
    if cfg.get("diagnostics") and group is not None and group.strategy == "fsdp":
        log.warning("diagnostics are not measured under trainer.strategy=fsdp (each rank holds a shard of a layer)")
    elif cfg.get("diagnostics"):
        parts.append(DiagnosticsPart(instantiate(cfg.diagnostics), compiled=bool(cfg.trainer.get("compile"))))
    parts.append(StepRows(cfg.trainer.get("log_every_n_steps", 20)))
    return [part for part in parts if part is not None]


def build_loggers(cfg: DictConfig) -> list:
    """The trackers of ``logger=[...]``; a missing package is refused here, before any step, naming the extra."""
    from stackwise_bench.training.loggers import check_available

    nodes = dict(cfg.get("logger") or {})
    check_available(list(nodes))
    return [instantiate(node) for node in nodes.values()]


def build_runtime(cfg: DictConfig, threads: int | None = None, device: str | None = None):
    """The run's :class:`~stackwise_bench.training.runtime.Runtime` from ``trainer.*``, ``precision`` and ``seed``."""
    from stackwise_bench.training.runtime import RUNTIME_KEYS, Runtime

    knobs = {k: cfg.trainer.get(k) for k in RUNTIME_KEYS if k in cfg.trainer}
    if knobs.get("threads") is None and threads is not None:
        knobs["threads"] = threads
    if knobs.get("device", "auto") == "auto" and device is not None:
        knobs["device"] = device
    return Runtime.create(**knobs, precision=cfg.precision.name, seed=cfg.seed)


# trainer.* knobs that configure the task or a step part, not the loop (build_task, build_parts read them).
PART_KEYS = ("label_smoothing", "ema", "ema_warmup_power", "best_weights")
# trainer.* knobs that say on how many devices the run trains (train.train_job starts the ranks from them).
GROUP_KEYS = ("devices", "strategy")


def build_trainer(cfg: DictConfig, runtime, resume: bool = False, group=None):
    """The Trainer from ``cfg.trainer``'s loop knobs (the runtime's keys went into ``runtime``, the task's and
    the parts' are :data:`PART_KEYS`)."""
    from stackwise_bench.training.runtime import RUNTIME_KEYS

    loop = [k for k in cfg.trainer if k not in RUNTIME_KEYS + PART_KEYS + GROUP_KEYS]
    # Called here, not given to instantiate: Hydra would turn the Runtime dataclass into a config node.
    trainer = instantiate(OmegaConf.masked_copy(cfg.trainer, loop), _partial_=True)
    return trainer(runtime=runtime, resume=resume, **({"group": group} if group is not None else {}))


def build_model(cfg: DictConfig, num_classes: int, total_steps: int | None = None) -> tuple:
    """The model as it trains: the configured net, its PEFT adapters on top, torchao FP8 layers for precision=fp8.

    ``total_steps``: the run's optimizer steps, which AdaLoRA's config needs to exist (the trainer's plan may
    still change it: :func:`build_adapter_schedule`).

    Returns ``(model, shape, fp8_layers)``: ``shape`` feeds the LoRA parameter formula, ``fp8_layers``
    names the converted layers (None unless fp8).
    """
    model = instantiate(cfg.model, num_classes=num_classes)
    shape = model_shape(model, cfg.lora.head)
    model = adapt(model, cfg, total_steps)
    fp8_layers = None
    if cfg.precision.name == "fp8":  # Runtime.create has already refused unsuitable hardware
        from stackwise_bench.quant.fp8 import convert_for_training

        fp8_layers = convert_for_training(model)
    return model, shape, fp8_layers


def adapt(model, cfg: DictConfig, total_steps: int | None = None):
    """``lora.method``'s adapters on ``model`` (rank 0: the model itself): peft's methods through
    :func:`~stackwise_bench.nn.lora.apply_lora`, QA-LoRA and QLoRA through :mod:`stackwise_bench.quant.qalora`."""
    from stackwise_bench.nn.lora import apply_lora, check_head, resolve_targets
    from stackwise_bench.nn.peft_methods import QUANTIZED_METHODS

    lora = OmegaConf.to_container(cfg.lora, resolve=True)
    method = lora.get("method", "lora")  # records written before lora.method trained LoRA
    if method not in QUANTIZED_METHODS or not lora["rank"]:
        return apply_lora(model, **lora, total_steps=max(1, total_steps or 1), model_name=cfg.model.name)
    from stackwise_bench.quant.qalora import apply_quantized_lora

    apply_lora(model, **{**lora, "rank": 0})  # the shared knobs' checks (rank, alpha, dropout, method)
    check_head(model, lora["head"])
    options = lora.get(method) or {}
    return apply_quantized_lora(
        model,
        method,
        lora["rank"],
        alpha=lora["alpha"],
        dropout=lora["dropout"],
        target_modules=resolve_targets(model, lora["target_modules"]),
        head=lora["head"],
        bits=options.get("bits", 4),
        group_size=options.get("group_size", 32),
    )


def build_adapter_schedule(cfg: DictConfig, model, total_steps: int):
    """AdaLoRA's loop-side schedule, its length set to the trainer's real step count (refused when its
    ``tinit``/``tfinal`` leave no steps to prune in); None for every other method."""
    from stackwise_bench.training.adapters import adapter_schedule

    method = cfg.lora.get("method", "lora")
    if not cfg.lora.rank:
        return None
    schedule = adapter_schedule(model, method, OmegaConf.to_container(cfg.lora, resolve=True).get(method))
    if schedule is not None:
        schedule.plan(total_steps)
    return schedule


def adapter_record(cfg: DictConfig, model) -> dict:
    """``summary.json``'s ``adapter`` section as a run starts: the method, its rank and the layers it adapted."""
    from stackwise_bench.nn.lora import adapted_layers, resolve_targets
    from stackwise_bench.nn.peft_methods import RANKLESS

    method, rank = cfg.lora.get("method", "lora"), cfg.lora.rank
    if not rank:
        return {"method": "full", "rank": 0, "targets": None, "layers": 0}
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    targets = cfg.lora.target_modules
    targets = OmegaConf.to_container(targets) if OmegaConf.is_config(targets) else targets
    if targets is None:
        from stackwise_bench.nn.lm_models import default_targets  # a causal LM's family targets (c_attn, ...)

        targets = default_targets(inner)
    targets = resolve_targets(inner, targets) if targets is not None else resolve_targets(inner, None)
    return {
        "method": method,
        "rank": None if method in RANKLESS else rank,
        "targets": targets,
        "layers": len(adapted_layers(inner, targets)),
    }


def model_shape(model, head_name: str | None) -> dict:
    """Inputs of the LoRA parameter formula (48·d·r + head): the width, depth and head size."""
    from stackwise_bench.nn.bert import is_bert
    from stackwise_bench.nn.lm_models import is_causal_lm, lm_shape

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if is_causal_lm(model) or is_bert(base):
        return lm_shape(model)
    head = model.get_submodule(head_name) if head_name and hasattr(model, head_name) else None
    blocks = getattr(model, "blocks", None)
    return {
        "head": sum(p.numel() for p in head.parameters()) if head is not None else None,
        "embed_dim": getattr(model, "embed_dim", None),
        "depth": len(blocks) if blocks is not None else None,
    }


def loader_options(data, runtime, img_size: int, model) -> dict:
    """BatchLoader options shared by every split, in training and in ``evaluate`` (the same test pixels).

    Batches are channels_last only for a convnet, the only kind ``Trainer.fit`` converts.
    """
    return dict(
        device=runtime.device,
        out_size=img_size,
        mean=data.mean,
        std=data.std,
        channels_last=runtime.wants_channels_last(model),
        seed=runtime.seed,
        on_device=runtime.data_on_device,
    )


def build_loaders(data, augment, trainer, img_size: int, model) -> Loaders:
    """The whole dataset goes to the device once; batches are sliced, augmented and resized there."""
    from stackwise_bench.data import BatchLoader

    common = loader_options(data, trainer.runtime, img_size, model)
    train = BatchLoader(
        data.train_x,
        data.train_y,
        trainer.batch_size,
        augment=augment if augment.enabled else None,
        shuffle=True,
        drop_last=True,
        **common,
    )
    val = BatchLoader(data.val_x, data.val_y, trainer.eval_batch_size, **common)
    test = BatchLoader(data.test_x, data.test_y, trainer.eval_batch_size, **common)
    return Loaders(train, val, test, data.num_classes)


class Rebuilt(NamedTuple):
    """A trained run's model with a checkpoint loaded, its test loader and runtime, for evaluation."""

    model: Any
    loader: Any
    runtime: Any
    classes: list
    epoch: int | None


def rebuild(config: dict, ckpt: Path, datasets: dict | None = None) -> Rebuilt:
    """Data, model (+ LoRA) and test loader exactly as training built them, from a run's resolved ``config``.

    ``datasets``: a dict kept by the caller across calls (``evaluate_study``), so runs with the same
    dataset config read it once.
    """
    import torch

    from stackwise_bench.data import BatchLoader
    from stackwise_bench.nn.growth import match_depth
    from stackwise_bench.nn.state_dict import load_weights, read_checkpoint

    cfg = OmegaConf.create(with_current_targets(config))
    runtime = build_runtime(cfg)
    runtime.apply()
    state, epoch = read_checkpoint(ckpt, runtime.device)
    key = json.dumps(config["dataset"], sort_keys=True, default=str)
    data = datasets.get(key) if datasets is not None else None
    if data is None:
        data = instantiate(cfg.dataset)
        if datasets is not None:
            datasets[key] = data
    model, _, _ = build_model(cfg, data.num_classes)  # FP8 layers keep nn.Linear's state_dict keys
    model = model.to(runtime.device)
    if runtime.wants_channels_last(model):  # as Trainer.fit does before training
        model = model.to(memory_format=torch.channels_last)
    match_depth(model, state)  # a depth-as-time checkpoint saved before a growth holds fewer blocks
    load_weights(model, state, ckpt, cfg.model.name + (f" with LoRA rank {cfg.lora.rank}" if cfg.lora.rank else ""))
    batch = runtime.eval_batch_size(cfg.trainer.get("eval_batch_size"), cfg.trainer.batch_size)
    loader = BatchLoader(data.test_x, data.test_y, batch, **loader_options(data, runtime, cfg.model.img_size, model))
    return Rebuilt(model=model, loader=loader, runtime=runtime, classes=list(data.classes), epoch=epoch)


def with_current_targets(node: Any) -> Any:
    """A recorded config with ``_target_`` paths of moved modules (:data:`MOVED_MODULES`) brought up to date."""
    if isinstance(node, dict):
        return {k: _current_target(v) if k == "_target_" else with_current_targets(v) for k, v in node.items()}
    if isinstance(node, list):
        return [with_current_targets(v) for v in node]
    return node


def _current_target(target: Any) -> Any:
    for old, new in MOVED_MODULES.items():
        if isinstance(target, str) and target.startswith(old):
            return new + target[len(old) :]
    return target
