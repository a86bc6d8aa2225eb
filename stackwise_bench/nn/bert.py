"""BERT encoders from transformers: ``BertForMaskedLM`` (pretraining) and ``BertForSequenceClassification`` (GLUE),
built from ``BertConfig`` (no hub download) or loaded from a local ``save_pretrained`` folder.

- Named sizes in :data:`SIZES`. The published ones are Devlin et al. (2019)'s base and large and Google's
  BERT-Tiny (Turc et al. 2019, the 24 compact models), with WordPiece's 30,522 ids and 512 positions:
  ``BertForMaskedLM`` base has 109,514,298 parameters (the encoder's 108,891,648 without the pooler, plus the MLM
  head's transform and output bias; the output weight is tied to the token embeddings).
- ``bert_micro`` is the CPU size of the tests and quick studies (nanoGPT's CPU model, halved in width).
- Post-LayerNorm blocks, GELU, LayerNorm eps 1e-12, init N(0, 0.02): BERT's own defaults, which ``BertConfig`` keeps.
- :func:`flops_per_token`: the training FLOPs per token, 6N + 12·L·H·Q·T, as nn/causal_lm.py prices a decoder.

transformers costs seconds to import, so it is imported inside the functions that build or load a model.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from stackwise_bench.errors import ConfigError, short_error
from stackwise_bench.values import is_int

BERT_VOCAB = 30522  # WordPiece's uncased vocabulary, as released
BERT_POSITIONS = 512
# Named sizes: depth, width, heads, feed-forward width, and the vocabulary/positions they were published with.
SIZES = {
    # CPU-sized: tests and quick studies (2 blocks of width 64; 128 positions are enough for windows of text).
    "bert_micro": {"n_layer": 2, "hidden": 64, "n_head": 2, "intermediate": 256, "positions": 128},
    # Google's BERT-Tiny (google/bert_uncased_L-2_H-128_A-2).
    "bert_tiny": {"n_layer": 2, "hidden": 128, "n_head": 2, "intermediate": 512, "positions": BERT_POSITIONS},
    "bert_base": {"n_layer": 12, "hidden": 768, "n_head": 12, "intermediate": 3072, "positions": BERT_POSITIONS},
    "bert_large": {"n_layer": 24, "hidden": 1024, "n_head": 16, "intermediate": 4096, "positions": BERT_POSITIONS},
}


def bert_config(
    size: str,
    vocab_size: int | None = None,
    max_positions: int | None = None,
    dropout: float = 0.1,
    pad_token_id: int = 0,
    **extra,
):
    """The ``BertConfig`` of the named size (SDPA attention); ``vocab_size``/``max_positions`` None: the published
    30,522 ids and the size's positions. ``extra`` goes to ``BertConfig`` (``num_labels``, ...)."""
    if size not in SIZES:
        raise ConfigError(f"model.name={size} is not a BERT size; use one of {', '.join(SIZES)}.")
    shape = SIZES[size]
    vocab_size = BERT_VOCAB if vocab_size is None else vocab_size
    max_positions = shape["positions"] if max_positions is None else max_positions
    for key, value in (("vocab_size", vocab_size), ("max_positions", max_positions)):
        if not is_int(value) or value < 2:
            raise ConfigError(f"model.{key}={value!r} must be an integer of 2 or more; use null for the default.")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"model.dropout={dropout!r} must be in [0, 1); use e.g. model.dropout=0.1 (BERT's).")
    if not is_int(pad_token_id) or not 0 <= pad_token_id < vocab_size:
        raise ConfigError(
            f"model.pad_token_id={pad_token_id!r} is not a token of the {vocab_size}-token vocabulary; take it "
            "from the tokenizer's special tokens."
        )
    from transformers import BertConfig  # lazy: seconds to import

    config = BertConfig(
        vocab_size=vocab_size, hidden_size=shape["hidden"], num_hidden_layers=shape["n_layer"],
        num_attention_heads=shape["n_head"], intermediate_size=shape["intermediate"],
        max_position_embeddings=max_positions, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
        pad_token_id=pad_token_id, tie_word_embeddings=True, **extra,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    return config


def build_bert_mlm(
    size: str,
    vocab_size: int | None = None,
    max_positions: int | None = None,
    dropout: float = 0.1,
    pad_token_id: int = 0,
    checkpoint_path: str | Path | None = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """A ``BertForMaskedLM`` of the named size (output layer tied to the token embeddings), or one loaded from a
    local ``save_pretrained`` folder.

    Args:
        size: A key of :data:`SIZES`.
        vocab_size: Token ids; None: BERT's 30,522. With the byte/bpe tokenizers: the tokenizer's size plus its
            special tokens (``data/text/special_tokens.py``).
        max_positions: Longest sequence; None: the size's (512 for the published sizes).
        dropout: Hidden and attention dropout (BERT's 0.1); 0 for exact comparisons.
        pad_token_id: The padding id (its embedding starts at zero and gets no gradient).
        checkpoint_path: A local folder to load instead; its config wins over the shape arguments.
        device: Where to build (``meta`` counts parameters without allocating).

    Raises:
        ConfigError: An unknown size, a bad option, or a checkpoint folder that is missing or not a BERT.
    """
    if checkpoint_path is not None:
        return load_bert(checkpoint_path, "mlm", device=device)
    config = bert_config(size, vocab_size, max_positions, dropout, pad_token_id)
    from transformers import BertForMaskedLM

    with torch.device(device) if device is not None else contextlib.nullcontext():
        return BertForMaskedLM(config)


def build_bert_classifier(
    size: str,
    num_labels: int,
    vocab_size: int | None = None,
    max_positions: int | None = None,
    dropout: float = 0.1,
    pad_token_id: int = 0,
    checkpoint_path: str | Path | None = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """A ``BertForSequenceClassification`` with ``num_labels`` outputs (1: a regression, STS-B's), fresh or with
    the encoder of a local ``save_pretrained`` folder (an MLM checkpoint: its head is dropped, the classifier is
    new, as every GLUE fine-tune starts). Arguments as :func:`build_bert_mlm`.
    """
    if not is_int(num_labels) or num_labels < 1:
        raise ConfigError(
            f"model.num_labels={num_labels!r} must be a positive integer (1 = regression); take it from the task."
        )
    problem = "regression" if num_labels == 1 else "single_label_classification"
    if checkpoint_path is not None:
        return load_bert(checkpoint_path, "classifier", num_labels=num_labels, device=device)
    config = bert_config(size, vocab_size, max_positions, dropout, pad_token_id, num_labels=num_labels)
    config.problem_type = problem
    from transformers import BertForSequenceClassification

    with torch.device(device) if device is not None else contextlib.nullcontext():
        return BertForSequenceClassification(config)


def load_bert(
    checkpoint_path: str | Path, head: str, num_labels: int | None = None, device: str | torch.device | None = None
) -> nn.Module:
    """A BERT from a local ``save_pretrained`` folder, offline, float32, SDPA, in train mode; ``head`` is ``mlm``
    or ``classifier`` (then with ``num_labels`` outputs).

    Raises:
        ConfigError: Not a folder (hub names are never downloaded), no ``config.json``, not a BERT, or unreadable.
    """
    key = f"model.checkpoint_path={checkpoint_path}"
    path = Path(checkpoint_path).expanduser()
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ConfigError(
            f"{key} is not a folder holding a config.json (hub models are never downloaded: runs are offline); "
            "point it at a folder written by save_pretrained."
        )
    from transformers import AutoConfig, BertForMaskedLM, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    try:
        kind = AutoConfig.from_pretrained(path, local_files_only=True).model_type
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{key} holds a config.json transformers cannot read ({short_error(e)}).") from e
    if kind != "bert":
        raise ConfigError(f"{key} holds a {kind} model, not a BERT; point it at a BERT save_pretrained folder.")
    cls, extra = BertForMaskedLM, {}
    if head == "classifier":
        problem = "regression" if num_labels == 1 else "single_label_classification"
        cls, extra = BertForSequenceClassification, {"num_labels": num_labels, "problem_type": problem}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "some weights were newly initialized": expected for a new classifier
    try:
        model = cls.from_pretrained(
            path, local_files_only=True, attn_implementation="sdpa", dtype=torch.float32, device_map=device, **extra
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(
            f"{key} could not be loaded ({short_error(e)}); point it at a complete save_pretrained folder."
        ) from e
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.train()  # from_pretrained returns eval mode; a built model starts in train mode


def is_bert(model: nn.Module) -> bool:
    """A transformers BERT (or a peft wrapper of one)."""
    return getattr(getattr(model, "config", None), "model_type", None) == "bert"


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The blocks that depth growth stacks: ``bert.encoder.layer`` (of the raw model, not a peft wrapper)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not is_bert(base) or not isinstance(getattr(getattr(base, "bert", None), "encoder", None), nn.Module):
        raise ConfigError(
            f"model: {type(base).__name__} is not a transformers BERT with an encoder; use e.g. model=bert_micro."
        )
    return base.bert.encoder.layer


def flops_per_token(model: nn.Module, seq_len: int) -> int:
    """Training FLOPs (forward + backward) per token: 6N + 12·L·H·Q·T, or 4N + 2·N_trainable with frozen weights.

    N counts the parameters in a matrix product: all but the position and segment embeddings and, where no output
    layer is tied to them (a classifier), the token embeddings (lookups). The MLM head's vocabulary projection runs
    on every position, as transformers computes it; the classifier's on [CLS] only is counted per token anyway
    (under 0.1% of N). The attention term is bidirectional: the full T x T scores, 2·2·H·Q·T per layer and token.
    """
    if not is_int(seq_len) or seq_len < 1:
        raise ConfigError(f"seq_len={seq_len!r} must be a positive integer; use e.g. dataset.seq_len=128.")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embeddings = base.bert.embeddings
    skip = [embeddings.position_embeddings.weight, embeddings.token_type_embeddings.weight]
    token, output = base.get_input_embeddings().weight, base.get_output_embeddings()
    if output is None or output.weight is not token:
        skip.append(token)
    skipped = {id(p) for p in skip}
    matmul = [p for p in {id(p): p for p in base.parameters()}.values() if id(p) not in skipped]
    n, trained = sum(p.numel() for p in matmul), sum(p.numel() for p in matmul if p.requires_grad)
    config = base.config
    head_dim = config.hidden_size // config.num_attention_heads
    return 4 * n + 2 * trained + 12 * config.num_hidden_layers * config.num_attention_heads * head_dim * seq_len


def build_named_bert(
    name: str,
    head: str = "mlm",
    num_labels: int | None = None,
    vocab_size: int | None = None,
    max_positions: int | None = None,
    dropout: float = 0.1,
    pad_token_id: int = 0,
    checkpoint_path: str | Path | None = None,
    **shape,
) -> nn.Module:
    """``conf/model/bert_*.yaml``'s builder: the named size of :data:`SIZES` (``shape`` keys ``n_layer``, ``hidden``,
    ``n_head``, ``intermediate`` replace its values) with the head the run's task needs: ``mlm`` (masked-LM
    pretraining on text) or ``classifier`` (GLUE, ``num_labels`` outputs; 1 = STS-B's regression).

    ``checkpoint_path`` loads a local ``save_pretrained`` folder instead (its config wins over the shape).
    """
    if head not in ("mlm", "classifier"):
        raise ValueError(f"head={head!r} is not mlm or classifier")
    if name not in SIZES:
        raise ConfigError(f"model.name={name} is not a BERT size; use one of {', '.join(SIZES)}.")
    unknown = set(shape) - set(_SHAPE_KEYS)
    if unknown:
        raise ConfigError(f"model.{sorted(unknown)[0]} is not a BERT knob; use {', '.join(_SHAPE_KEYS)}.")
    if checkpoint_path is not None:
        return load_bert(checkpoint_path, head, num_labels=num_labels)
    if head == "classifier" and (not is_int(num_labels) or num_labels < 1):
        raise ConfigError(
            f"model.num_labels={num_labels!r} must be a positive integer (1 = regression); take it from the task."
        )
    extra = {"num_labels": num_labels} if head == "classifier" else {}
    config = bert_config(name, vocab_size, max_positions, dropout, pad_token_id, **extra)
    for key, value in shape.items():
        if not is_int(value) or value < 1:
            raise ConfigError(f"model.{key}={value!r} must be a positive integer; use the size's (null).")
        setattr(config, _SHAPE_KEYS[key], value)
    if config.hidden_size % config.num_attention_heads:
        raise ConfigError(
            f"model.n_head={config.num_attention_heads} must divide model.hidden={config.hidden_size}; use e.g. "
            f"model.n_head={SIZES[name]['n_head']}."
        )
    if head == "mlm":
        from transformers import BertForMaskedLM

        return BertForMaskedLM(config)
    config.problem_type = "regression" if num_labels == 1 else "single_label_classification"
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification(config)


_SHAPE_KEYS = {"n_layer": "num_hidden_layers", "hidden": "hidden_size", "n_head": "num_attention_heads",
               "intermediate": "intermediate_size"}  # fmt: skip


def check_encoder_fits(model: nn.Module, name: str, tokenizer: str, vocab_size: int, seq_len: int) -> None:
    """Refuse, in one sentence, a BERT whose vocabulary cannot hold the tokenizer's ids and the 4 special ones, or
    whose positions are fewer than ``dataset.seq_len`` (checked here for a model loaded from a checkpoint too)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    held, positions = base.config.vocab_size, base.config.max_position_embeddings
    if held < vocab_size:
        raise ConfigError(
            f"model.vocab_size={held} is smaller than the {vocab_size} ids of dataset.tokenizer={tokenizer} and "
            f"BERT's 4 special tokens (model={name}); set model.vocab_size=null to take them."
        )
    if seq_len > positions:
        raise ConfigError(
            f"dataset.seq_len={seq_len} is beyond model={name}'s {positions} positions; use dataset.seq_len<="
            f"{positions} or a larger model.max_positions."
        )
