"""Relations between keys, checked once every key has passed its own check: :data:`RULES` for the training config.

A rule takes ``get`` (a dotted key to its value, or :data:`ABSENT` where this config does not have it) and returns
its refusal, one sentence, or None. :func:`_quantized_only` makes the evaluation configs' one rule
(the quantization options only where they apply).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from stackwise_bench.knobs.specs import show

ABSENT = object()  # a key this config (this option of its group) does not have

Get = Callable[..., object]  # get(dotted key, plain=True) -> its value (plain dicts/lists), or ABSENT
Rule = Callable[[Get], "str | None"]


def _monitors_are_configs(get: Get) -> str | None:
    for name, node in get("monitors").items():
        if not (isinstance(node, Mapping) and node.get("_target_")):
            return (
                f"monitors.{name}={show(node)} must be a monitor config with a _target_; remove it with "
                f"~monitors.{name}, or use monitors=none for no monitors."
            )
    return None


def _digits_size(get: Get) -> str | None:
    size = get("dataset.img_size")
    if get("dataset._target_") == "stackwise_bench.data.load_digits" and size is not ABSENT and size < 8:
        return (
            f"dataset.img_size={size} must be an integer >= 8 for dataset=digits (its images are 8x8); "
            "use e.g. dataset.img_size=32."
        )
    return None


def _synthetic_counts(get: Get) -> str | None:
    n, k = get("dataset.num_train"), get("dataset.num_classes")
    if n is not ABSENT and k is not ABSENT and n < k:
        return (
            f"dataset.num_train={n} must be at least dataset.num_classes={k} (one image per class); "
            "use e.g. dataset.num_train=512."
        )
    return None


def _heads_divide_width(get: Get) -> str | None:
    heads, width = get("model.num_heads"), get("model.embed_dim")
    if heads is not ABSENT and width is not ABSENT and width % heads:
        return (
            f"model.num_heads={heads} must divide model.embed_dim={width} (each head gets embed_dim / num_heads "
            f"channels); use e.g. model.num_heads={max(d for d in range(1, min(heads, width) + 1) if width % d == 0)}."
        )
    return None


def _token_pool_needs_class_token(get: Get) -> str | None:
    if get("model.global_pool") == "token" and get("model.class_token") is False:
        return (
            "model.global_pool=token pools the class token, and model.class_token=false removes it; "
            "use model.global_pool=avg or model.class_token=true."
        )
    return None


def _warmup_within_training(get: Get) -> str | None:
    warmup, epochs = get("scheduler.warmup_epochs"), get("trainer.max_epochs")
    if warmup is not ABSENT and epochs is not ABSENT and warmup > epochs:
        return (
            f"scheduler.warmup_epochs={show(warmup)} must not exceed trainer.max_epochs={epochs} (the learning rate "
            "would never reach optimizer.lr); use e.g. scheduler.warmup_epochs=1."
        )
    return None


def _depth_time_grows_a_plain_model(get: Get) -> str | None:
    """Growth copies and inserts plain blocks: not peft adapters, a compiled graph or torchao float8 layers."""
    if not str(get("regime._target_")).endswith(".DepthTime"):
        return None
    rank = get("lora.rank")
    if rank is not ABSENT and rank:
        return (
            f"regime=depth_time grows the model's blocks during training, and lora.rank={rank} freezes them behind "
            "adapters that new blocks would not have; use lora.rank=0 (full training) or regime=classical."
        )
    if get("trainer.compile") is True:
        return (
            "regime=depth_time changes the model's depth during training, which a compiled graph does not follow; "
            "use trainer.compile=false or regime=classical."
        )
    if get("precision.name") == "fp8":
        return (
            "regime=depth_time adds blocks that the float8 training conversion has not seen; use precision=bf16 "
            "or regime=classical."
        )
    return None


def _weight_average(get: Get) -> str | None:
    """``trainer.best_weights=ema`` needs an average; an average needs a fixed set of weights and per-layer rates
    that a growing model's regrouping would not drop."""
    ema, best = get("trainer.ema"), get("trainer.best_weights")
    if best == "ema" and ema in (None, ABSENT):
        return (
            "trainer.best_weights=ema picks best.pt by the weight average's validation, and trainer.ema=null "
            "keeps none; set trainer.ema=0.999 or trainer.best_weights=raw."
        )
    if not str(get("regime._target_")).endswith(".DepthTime"):
        return None
    regime = "depth_time"
    if ema not in (None, ABSENT):
        return (
            f"trainer.ema={show(ema)} averages a fixed set of weights, and regime={regime} grows the model during "
            "training; set trainer.ema=null or use regime=classical."
        )
    decay = get("optimizer.layer_decay")
    if decay not in (None, ABSENT):
        return (
            f"optimizer.layer_decay sets per-layer learning rates (optimizer.layer_decay={show(decay)}), which "
            f"regime={regime} regroups away when it grows the model; set optimizer.layer_decay=null or use "
            "regime=classical."
        )
    return None


def _target_regex_compiles(get: Get) -> str | None:
    """A string ``lora.target_modules`` is a regex (peft's rule): one that does not compile is refused here."""
    targets = get("lora.target_modules")
    if not isinstance(targets, str):
        return None
    try:
        re.compile(targets)
    except re.error as exc:
        return (
            f"lora.target_modules={show(targets)} is not a valid regular expression ({exc}); escape the dots, "
            r"e.g. lora.target_modules='blocks\.\d+\.attn\.qkv', or give a list of names like [qkv]."
        )
    return None


LM_MODEL = "stackwise_bench.nn.causal_lm.build_named"  # conf/model/{gpt_*,llama_*}.yaml
TEXT_DATA = "stackwise_bench.data.text.dataset.load_text_dataset"  # conf/dataset/{shakespeare,text}.yaml
TOKENIZER_IDS = {"byte": 256, "gpt2": 50257}  # dataset.tokenizer=bpe has dataset.bpe_vocab_size ids
BERT_MODEL = "stackwise_bench.nn.bert.build_named_bert"  # conf/model/bert_*.yaml
GLUE_DATA = "stackwise_bench.data.text.glue_data.load_glue_dataset"  # conf/dataset/glue.yaml
N_SPECIAL = 4  # BERT's [PAD] [CLS] [SEP] [MASK], past the tokenizer's ids (= data.text.special_tokens.N_SPECIAL)


def _model_reads_the_data(get: Get) -> str | None:
    """A language model trains on text and an image model on images; a language model's vocabulary and context
    must hold the tokenizer's ids and a whole window (checked again on the built model)."""
    lm, text = get("model._target_") == LM_MODEL, get("dataset._target_") == TEXT_DATA
    model = show(get("model.name"))
    if get("model._target_") == BERT_MODEL or get("dataset._target_") == GLUE_DATA:
        return _encoder_reads_the_data(get, model, text)
    if lm and not text:
        data = get("dataset.name")
        data = data if isinstance(data, str) else str(get("dataset._target_")).rpartition(".")[2].split("_")[-1]
        return (
            f"model={model} is a language model and dataset {data} holds images; train it on text "
            "(dataset=shakespeare or dataset=text) or pick an image model (model=resnet8)."
        )
    if text and not lm:
        return (
            f"model={model} is an image model and dataset.corpus={show(get('dataset.corpus'))} is text; train a "
            "language model on it (model=gpt_micro) or pick an image dataset (dataset=digits)."
        )
    if not lm:
        return None
    seq_len, context = get("dataset.seq_len"), get("model.context")
    if seq_len is not ABSENT and context is not ABSENT and seq_len > context:
        return (
            f"dataset.seq_len={seq_len} is beyond model={model}'s context of {context} tokens; use "
            f"dataset.seq_len<={context} or a larger model.context."
        )
    tokenizer, vocab = get("dataset.tokenizer"), get("model.vocab_size")
    ids = get("dataset.bpe_vocab_size") if tokenizer == "bpe" else TOKENIZER_IDS.get(tokenizer)
    if vocab not in (None, ABSENT) and ids not in (None, ABSENT) and vocab < ids:
        return (
            f"model.vocab_size={vocab} is smaller than the {ids} ids of dataset.tokenizer={tokenizer} (the model "
            "would meet ids it has no embedding for); set model.vocab_size=null to take the tokenizer's."
        )
    return None


def _encoder_reads_the_data(get: Get, model: str, text: bool) -> str | None:
    """A BERT pretrains on text (masked LM) or fine-tunes on GLUE; GLUE needs an encoder; a sequence must fit the
    encoder's positions and its vocabulary the tokenizer's ids and the 4 special ones."""
    bert, glue = get("model._target_") == BERT_MODEL, get("dataset._target_") == GLUE_DATA
    if glue and not bert:
        kind = "a decoder (causal language model)" if get("model._target_") == LM_MODEL else "an image model"
        return (
            f"model={model} is {kind}, and dataset=glue fine-tunes an encoder's classifier; use a BERT "
            "(model=bert_micro, bert_tiny, bert_base or bert_large)."
        )
    if not (text or glue):
        return (
            f"model={model} is a BERT encoder, which pretrains on text (masked LM: dataset=shakespeare or "
            "dataset=text) or fine-tunes on GLUE (dataset=glue); pick one of those, or an image model for images."
        )
    seq_len, positions = get("dataset.seq_len"), get("model.max_positions")
    if seq_len is not ABSENT and positions not in (None, ABSENT) and seq_len > positions:
        return (
            f"dataset.seq_len={seq_len} is beyond model={model}'s {positions} positions; use "
            f"dataset.seq_len<={positions} or a larger model.max_positions."
        )
    tokenizer, vocab = get("dataset.tokenizer"), get("model.vocab_size")
    ids = get("dataset.bpe_vocab_size") if tokenizer == "bpe" else TOKENIZER_IDS.get(tokenizer)
    if vocab not in (None, ABSENT) and ids not in (None, ABSENT) and vocab < ids + N_SPECIAL:
        return (
            f"model.vocab_size={vocab} is smaller than the {ids} ids of dataset.tokenizer={tokenizer} and BERT's "
            f"{N_SPECIAL} special tokens; set model.vocab_size=null to take them."
        )
    return _encoder_options(get, model, glue)


def _encoder_options(get: Get, model: str, glue: bool) -> str | None:
    """What BERT runs do not offer (yet): adapters, float8 training, micro-batches of GLUE's dict batches."""
    rank = get("lora.rank")
    if rank not in (0, None, ABSENT):
        return (
            f"lora.rank={rank}: adapters are not wired for BERT encoders (model={model}) yet; use lora.rank=0 "
            "(full fine-tuning)."
        )
    if get("precision.name") == "fp8":
        return f"precision=fp8 is not wired for BERT encoders (model={model}); use precision=bf16 or fp32."
    if glue and get("trainer.accumulate") not in (1, ABSENT):
        return (
            f"trainer.accumulate={get('trainer.accumulate')} is not wired for GLUE's batches yet; use "
            "trainer.accumulate=1 (and a smaller trainer.batch_size for memory)."
        )
    return None


CONV1D_UNSUPPORTED = ("loha", "lokr", "oft")  # peft builds these on nn.Linear/Conv layers, not transformers' Conv1D
QUANTIZED_LORA = ("qalora", "qlora")  # = nn.peft_methods.QUANTIZED_METHODS (knobs sit below nn): image layers only


def _language_model_options(get: Get) -> str | None:
    """Options built for image models' layers that a language model would not honour."""
    if get("model._target_") != LM_MODEL:
        return None
    model = show(get("model.name"))
    if get("precision.name") == "fp8":
        return (
            f"precision=fp8 is not wired for language models (model={model}); use precision=bf16 (or fp16 on a "
            "GPU, fp32 anywhere)."
        )
    method, rank = get("lora.method"), get("lora.rank")
    if rank in (0, None, ABSENT):
        return None
    if method in QUANTIZED_LORA:
        return (
            f"lora.method={method} quantizes image models' layers and is not wired for language models; use "
            f"lora.method=lora (or dora, rslora, ...) on model={model}."
        )
    if method in CONV1D_UNSUPPORTED and get("model.family") == "gpt2":
        return (
            f"lora.method={method} has no adapter in peft for GPT-2's Conv1D projections (model={model}); use "
            "lora.method=lora (or dora, rslora, pissa, adalora, vera, ia3), or a LLaMA model (model=llama_micro)."
        )
    return None


def _one_budget(get: Get) -> str | None:
    tokens, flops = get("dataset.train_tokens"), get("trainer.max_flops")
    if tokens not in (None, ABSENT) and flops not in (None, ABSENT):
        return (
            f"dataset.train_tokens={tokens} sets this run's budget in tokens, and trainer.max_flops={show(flops)} "
            "another in FLOPs; keep one of them."
        )
    return None


def _accumulate_within_batch(get: Get) -> str | None:
    steps, batch = get("trainer.accumulate"), get("trainer.batch_size")
    if steps is not ABSENT and batch is not ABSENT and steps > batch:
        return (
            f"trainer.accumulate={steps} splits each batch of trainer.batch_size={batch} into more micro-batches "
            f"than it has samples; use trainer.accumulate<={batch}."
        )
    return None


def _devices(get: Get) -> str | None:
    """What a run on several devices cannot do: an uneven batch, FSDP without blocks or with a growing model."""
    devices, strategy = get("trainer.devices"), get("trainer.strategy")
    if devices is ABSENT or devices == 1:
        return None
    batch = get("trainer.batch_size")
    if batch % devices:
        return (
            f"trainer.batch_size={batch} does not divide into trainer.devices={devices} equal slices (each rank "
            f"trains on batch_size/devices); use e.g. trainer.batch_size={max(devices, batch // devices * devices)}."
        )
    if get("trainer.accumulate") not in (ABSENT, 1) and (batch // devices) < get("trainer.accumulate"):
        return (
            f"trainer.accumulate={get('trainer.accumulate')} splits each rank's slice of {batch // devices} samples "
            f"into more micro-batches than it has; use trainer.accumulate<={batch // devices}."
        )
    device = get("trainer.device")
    if isinstance(device, str) and ":" in device:
        return (
            f"trainer.device={device} names one GPU, but trainer.devices={devices} trains on several (rank r on "
            "cuda:r); use trainer.device=auto or trainer.device=cuda."
        )
    if get("lora.method") in ("qalora", "qlora"):
        return (
            f"lora.method={get('lora.method')} trains on one device (its merged test runs in one process); use "
            "trainer.devices=1, or lora.method=lora."
        )
    if strategy != "fsdp":
        return None
    model = str(get("model.name"))
    if model.startswith("resnet"):
        return (
            f"trainer.strategy=fsdp shards a model block by block, and model={model} has no block list to wrap; "
            "use trainer.strategy=ddp, or a transformer (model=vit_micro_p4, deit_tiny, gpt_micro)."
        )
    if get("regime._target_") == "stackwise_bench.training.regime.DepthTime":
        return (
            "regime=depth_time grows the model, which FSDP's sharded blocks cannot; use trainer.strategy=ddp "
            "(DDP is rebuilt after each growth), or regime=classical."
        )
    if get("trainer.ema") not in (ABSENT, None):
        return (
            f"trainer.ema={get('trainer.ema')} keeps a whole copy of the weights, which FSDP's shards do not give "
            "it; use trainer.strategy=ddp, or trainer.ema=null."
        )
    return None


RULES: list[Rule] = [
    _devices,
    _model_reads_the_data,
    _language_model_options,
    _accumulate_within_batch,
    _one_budget,
    _monitors_are_configs,
    _digits_size,
    _synthetic_counts,
    _heads_divide_width,
    _token_pool_needs_class_token,
    _warmup_within_training,
    _depth_time_grows_a_plain_model,
    _weight_average,
    _target_regex_compiles,
]


INT_FORMATS = ("int8", "int4")  # post-training integer weights (stackwise_bench.quant.intq), beside FP8's
GROUP_SIZE_DEFAULT = 32  # int4 weights per scale and zero point (conf/evaluate.yaml's group_size)


def int_activations_problem(prefix: str, fmt: str) -> str:
    """The one sentence refusing ``activations=true`` with an integer format (integer PTQ is weight-only)."""
    return (
        f"{prefix}activations=true applies to the FP8 formats only ({prefix}quantize={fmt} is weight-only integer "
        f"quantization); drop {prefix}activations, or use {prefix}quantize=fp8_e4m3 to quantize activations too."
    )


def group_size_problem(prefix: str, fmt, group_size) -> str | None:
    """``group_size`` other than its default without ``quantize=int4`` (it means nothing there), or None."""
    if group_size is ABSENT or group_size == GROUP_SIZE_DEFAULT or fmt == "int4":
        return None
    return (
        f"{prefix}group_size={show(group_size)} only applies to {prefix}quantize=int4 (not {prefix}quantize="
        f"{show(fmt)}); add {prefix}quantize=int4, or drop {prefix}group_size."
    )


def _quantized_only(prefix: str) -> Rule:
    """The evaluation configs' rule: the quantization options only where they apply."""

    def rule(get: Get) -> str | None:
        fmt = get(f"{prefix}quantize")
        if fmt is None:
            for key, default in (("activations", False), ("keep_head", True)):
                value = get(f"{prefix}{key}")
                if value is not ABSENT and value != default:
                    return (
                        f"{prefix}{key}={show(value)} only applies to a quantized model; add "
                        f"{prefix}quantize=fp8_e4m3 (or fp8_e5m2, int8, int4), or drop {prefix}{key}."
                    )
        if problem := group_size_problem(prefix, fmt, get(f"{prefix}group_size")):
            return problem
        if fmt in INT_FORMATS and get(f"{prefix}activations") is True:
            return int_activations_problem(prefix, fmt)
        return None

    return rule
