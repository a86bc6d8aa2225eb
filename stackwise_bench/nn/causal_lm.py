"""Causal language models from transformers: GPT-2 (``GPT2LMHeadModel``) and LLaMA (``LlamaForCausalLM``), built
from their config classes (no hub download) or loaded from a local ``save_pretrained`` folder.

- SDPA attention, token embeddings tied to the output layer (LLaMA's own default leaves them untied).
- Named sizes in :data:`SIZES`; the published GPT-2 ones have the exact parameter counts with tied embeddings,
  vocabulary 50,257 and context 1,024: small 124,439,808, medium 354,823,168, large 774,030,080 (nanoGPT's
  123.69M for small leaves out the position embeddings).
- ``nanogpt=True`` aligns a GPT-2 with nanoGPT's ``model.py`` (karpathy/nanoGPT at 3adf61e, run with ``bias=True``,
  its GPT-2-compatible setting): exact GELU (``activation_function="gelu"``; GPT-2's own is the tanh form
  ``gelu_new``) and dropout 0 (transformers defaults to 0.1). The rest already agrees in every build here:
  biases everywhere, learned position embeddings, tied token embeddings, LayerNorm eps 1e-5, init N(0, 0.02) with
  the residual projections (``attn.c_proj``, ``mlp.c_proj``) at 0.02/sqrt(2 * n_layer).
- :func:`flops_per_token`: nanoGPT's training FLOPs per token, 6N + 12·L·H·Q·T.

transformers costs seconds to import, so it is imported inside the functions that build or load a model; the
vision path never loads it.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch
from torch import nn

from stackwise_bench.errors import ConfigError, short_error
from stackwise_bench.values import is_int

FAMILIES = ("gpt2", "llama")
# The families' default LoRA targets: GPT-2's fused qkv projection (a transformers Conv1D, whose weight is stored
# transposed: peft sets fan_in_fan_out=True for it itself, with a warning), LLaMA's query and value projections
# (the LoRA paper's choice, which LLaMA recipes keep).
LORA_TARGETS = {"gpt2": ("c_attn",), "llama": ("q_proj", "v_proj")}

# Named sizes: family and shape; the vocabulary comes from the tokenizer (50,257 for GPT-2's BPE).
SIZES = {
    # nanoGPT's CPU recipe (config/train_shakespeare_char.py, "baby GPT" on a laptop): tests and quick studies.
    "gpt_micro": {"family": "gpt2", "n_layer": 4, "n_embd": 128, "n_head": 4, "context": 64},
    # nanoGPT's shakespeare_char GPU recipe: the small pretrained model of the PEFT study.
    "gpt_mini": {"family": "gpt2", "n_layer": 6, "n_embd": 384, "n_head": 6, "context": 256},
    # The published GPT-2 sizes (Radford et al. 2019, as released: context 1,024).
    "gpt2_small": {"family": "gpt2", "n_layer": 12, "n_embd": 768, "n_head": 12, "context": 1024},
    "gpt2_medium": {"family": "gpt2", "n_layer": 24, "n_embd": 1024, "n_head": 16, "context": 1024},
    "gpt2_large": {"family": "gpt2", "n_layer": 36, "n_embd": 1280, "n_head": 20, "context": 1024},
    # LLaMA blocks (RMSNorm, rotary positions, SwiGLU) at the GPT sizes above, for family comparisons.
    "llama_micro": {"family": "llama", "n_layer": 4, "n_embd": 128, "n_head": 4, "context": 64},
    "llama_mini": {"family": "llama", "n_layer": 6, "n_embd": 384, "n_head": 6, "context": 256},
}
GPT2_VOCAB = 50257
_HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")  # "gpt2", "openai-community/gpt2"


def build_causal_lm(
    family: str,
    n_layer: int,
    n_embd: int,
    n_head: int,
    vocab_size: int,
    context: int,
    *,
    dropout: float = 0.0,
    activation: str | None = None,
    nanogpt: bool = False,
    intermediate_size: int | None = None,
    n_kv_head: int | None = None,
    rope_theta: float = 10000.0,
    norm_eps: float = 1e-5,
    init_std: float = 0.02,
    eos_token_id: int | None = None,
    checkpoint_path: str | Path | None = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Build a GPT-2 or LLaMA causal LM with SDPA attention and tied embeddings, or load one from a local folder.

    Args:
        family: ``gpt2`` (``GPT2LMHeadModel``) or ``llama`` (``LlamaForCausalLM``).
        n_layer: Blocks.
        n_embd: Width (``hidden_size``).
        n_head: Attention heads (query heads for LLaMA).
        vocab_size: Token vocabulary, the tokenizer's size.
        context: Longest sequence (GPT-2's learned position table; LLaMA's ``max_position_embeddings``).
        dropout: Dropout on embeddings, residuals and attention (GPT-2) or attention (LLaMA); 0 for pretraining.
        activation: GPT-2's MLP activation; None: ``gelu_new`` (GPT-2's tanh GELU), or ``gelu`` with ``nanogpt``.
        nanogpt: Align a GPT-2 with nanoGPT's model (module docstring): exact GELU, dropout 0.
        intermediate_size: LLaMA's SwiGLU width; None: LLaMA's rule, 2/3 of 4·n_embd rounded up to 256.
        n_kv_head: LLaMA's key/value heads (grouped-query attention); None: ``n_head``.
        rope_theta: LLaMA's rotary base.
        norm_eps: LayerNorm (GPT-2) or RMSNorm (LLaMA) epsilon.
        init_std: ``initializer_range``: the std of the normal init.
        eos_token_id: End-of-text id; None: GPT-2's 50,256 when the vocabulary is GPT-2's, else none.
        checkpoint_path: A local ``save_pretrained`` folder to load instead (:func:`load_causal_lm`); the shape
            arguments must then match the saved config.
        device: Where to build (``meta`` counts parameters without allocating); None: the default device.

    Raises:
        ConfigError: A bad size or option, or a checkpoint folder that is missing or does not match.
    """
    _check_family(family)
    if checkpoint_path is not None:
        model = load_causal_lm(checkpoint_path, device=device)
        _check_loaded(model, checkpoint_path, family, n_layer, n_embd, n_head, vocab_size, context)
        return model
    _check_shape(n_layer, n_embd, n_head, vocab_size, context)
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"model.dropout={dropout!r} must be in [0, 1); use e.g. model.dropout=0.0.")
    if eos_token_id is not None and not (is_int(eos_token_id) and 0 <= eos_token_id < vocab_size):
        raise ConfigError(
            f"model.eos_token_id={eos_token_id!r} is not a token of the {vocab_size}-token vocabulary; take it "
            "from the tokenizer or set it to null."
        )
    if eos_token_id is None and vocab_size >= GPT2_VOCAB and family == "gpt2":
        eos_token_id = GPT2_VOCAB - 1  # <|endoftext|>
    common = {"vocab_size": vocab_size, "initializer_range": init_std, "tie_word_embeddings": True}
    common |= {"bos_token_id": eos_token_id, "eos_token_id": eos_token_id}
    if family == "gpt2":
        activation = _gpt2_activation(activation, nanogpt, dropout, norm_eps, init_std)
        config = _gpt2_config(n_layer, n_embd, n_head, context, dropout, activation, norm_eps, common)
    else:
        if nanogpt or activation is not None:
            raise ConfigError(
                "model.nanogpt and model.activation apply to family=gpt2 only; drop them for family=llama."
            )
        config = _llama_config(
            n_layer, n_embd, n_head, context, dropout, intermediate_size, n_kv_head, rope_theta, norm_eps, common
        )
    from transformers import GPT2LMHeadModel, LlamaForCausalLM  # lazy: seconds to import

    config._attn_implementation = "sdpa"
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = (GPT2LMHeadModel if family == "gpt2" else LlamaForCausalLM)(config)
    model.loss_type = "ForCausalLM"  # GPT2LMHeadModel's class name maps to no loss: transformers warns, then uses it
    return model


def build_named(name: str, vocab_size: int = GPT2_VOCAB, **overrides) -> nn.Module:
    """Build the named size from :data:`SIZES` (``gpt2_small``, ``gpt_micro``, ``llama_mini``, ...).

    ``overrides`` replace the size's keys (``n_layer``, ``context``, ...) or pass options to :func:`build_causal_lm`.
    """
    if name not in SIZES:
        raise ConfigError(f"model.name={name} is not a language-model size; use one of {', '.join(SIZES)}.")
    return build_causal_lm(**(SIZES[name] | {"vocab_size": vocab_size} | overrides))


def load_causal_lm(checkpoint_path: str | Path, device: str | torch.device | None = None) -> nn.Module:
    """Load a GPT-2 or LLaMA from a local ``save_pretrained`` folder, offline, in float32 with SDPA attention, in
    train mode (as a built model).

    Raises:
        ConfigError: The path is not a folder (a hub name is never downloaded), holds no ``config.json``, holds
            another kind of model, or its weights cannot be read.
    """
    key = f"model.checkpoint_path={checkpoint_path}"
    path = Path(checkpoint_path).expanduser()
    if not path.is_dir():
        if _HUB_NAME.match(str(checkpoint_path)):
            raise ConfigError(
                f"{key} is not a local folder and hub models are never downloaded (runs are offline); download it "
                f"where there is network (`hf download {checkpoint_path} --local-dir DIR`, or save_pretrained(DIR)), "
                "copy DIR here and set model.checkpoint_path=DIR."
            )
        raise ConfigError(f"{key} is not a folder; point it at a folder written by save_pretrained.")
    if _is_encoder_run(path):
        raise ConfigError(_ENCODER.format(key=key))
    if not (path / "config.json").is_file():
        raise ConfigError(f"{key} holds no config.json; point it at a folder written by save_pretrained.")
    from transformers import AutoConfig, GPT2LMHeadModel, LlamaForCausalLM  # lazy: seconds to import

    try:
        family = AutoConfig.from_pretrained(path, local_files_only=True).model_type
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{key} holds a config.json transformers cannot read ({short_error(e)}).") from e
    if family == "bert":
        raise ConfigError(_ENCODER.format(key=key))
    if family not in FAMILIES:
        raise ConfigError(f"{key} holds a {family} model; language models here are {' or '.join(FAMILIES)}.")
    from transformers.utils import logging as hf_logging

    cls = GPT2LMHeadModel if family == "gpt2" else LlamaForCausalLM
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar per load would litter every run's log
    try:
        model = cls.from_pretrained(
            path, local_files_only=True, attn_implementation="sdpa", dtype=torch.float32, device_map=device
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(
            f"{key} could not be loaded ({short_error(e)}); point it at a complete save_pretrained folder."
        ) from e
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    model.loss_type = "ForCausalLM"
    return model.train()  # from_pretrained returns eval mode; a built model starts in train mode, so both do


_ENCODER = (
    "{key} holds a BERT encoder, which has no causal language-model head to train, sample or export as one; "
    "train it with model=bert_micro (or bert_tiny, bert_base, bert_large)."
)


def _is_encoder_run(path: Path) -> bool:
    """A masked-LM run's folder (model=bert_* on text): what a causal LM must not be started from."""
    from stackwise_bench.runs.contract import read_summary

    try:
        summary = read_summary(path) if (path / "checkpoints").is_dir() else None
    except ConfigError:
        return False
    return ((summary or {}).get("task") or {}).get("name") == "masked_lm"


def lora_targets(family_or_model: str | nn.Module) -> list[str]:
    """The family's default LoRA target modules (:data:`LORA_TARGETS`), by family name or from a model."""
    family = family_or_model
    if isinstance(family_or_model, nn.Module):
        family = getattr(getattr(family_or_model, "config", None), "model_type", None)
    _check_family(family)
    return list(LORA_TARGETS[family])


def flops_per_token(model: nn.Module, seq_len: int) -> int:
    """Training FLOPs (forward + backward) per token, nanoGPT's estimate: 6N + 12·L·H·Q·T; with frozen weights
    (PEFT), 4N + 2·N_trainable + 12·L·H·Q·T.

    N is the parameters that take part in a matrix product: every parameter once, less the position embeddings
    (as nanoGPT's ``get_num_params(non_embedding=True)``) and, where the output layer is not tied to them, the
    input token embeddings (a lookup). A tied embedding counts once, as the output layer. L is the depth, H the
    query heads, Q the head width, T ``seq_len``: the attention scores and their weighted sum, 2·2·H·Q·T per
    layer and token in the forward pass, three times that with the backward. Neither term credits the causal mask
    (the kernels compute the full square), and norms, activations and softmax are left out: on a GPT-2 step
    ``torch.utils.flop_counter.FlopCounterMode`` agrees within 1% (tests/test_causal_lm_flops.py).

    Each weight costs 2 FLOPs per token forward, 2 for its input's gradient and 2 for its own: a frozen weight
    skips the last, so a LoRA run is priced 4N + 2·N_trainable (adapters included in both), not 6N.
    """
    if not is_int(seq_len) or seq_len < 1:
        raise ConfigError(f"seq_len={seq_len!r} must be a positive integer; use e.g. dataset.seq_len=256.")
    config = model.config
    unique = {id(p): p for p in model.parameters()}
    skip = [model.transformer.wpe.weight] if config.model_type == "gpt2" else []  # LLaMA's rotary: no parameters
    token, output = model.get_input_embeddings().weight, model.get_output_embeddings()
    if output is None or output.weight is not token:
        skip.append(token)
    skipped = {id(p) for p in skip}
    matmul = [p for key, p in unique.items() if key not in skipped]
    n, trained = sum(p.numel() for p in matmul), sum(p.numel() for p in matmul if p.requires_grad)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 4 * n + 2 * trained + 12 * config.num_hidden_layers * heads * head_dim * seq_len


def _check_family(family) -> None:
    if family not in FAMILIES:
        raise ConfigError(f"model.family={family} is not a language-model family; use one of {', '.join(FAMILIES)}.")


def _check_shape(n_layer, n_embd, n_head, vocab_size, context) -> None:
    for key, value in (("n_layer", n_layer), ("n_embd", n_embd), ("n_head", n_head), ("context", context)):
        if not is_int(value) or value < 1:
            raise ConfigError(f"model.{key}={value!r} must be a positive integer; use e.g. model.{key}=4.")
    if not is_int(vocab_size) or vocab_size < 2:
        raise ConfigError(
            f"model.vocab_size={vocab_size!r} must be an integer of 2 or more; take it from the tokenizer."
        )
    if n_embd % n_head:
        raise ConfigError(
            f"model.n_embd={n_embd} is not a multiple of model.n_head={n_head}; pick a width that the heads divide."
        )


def _gpt2_activation(activation, nanogpt: bool, dropout: float, norm_eps: float, init_std: float) -> str:
    if not nanogpt:
        return activation or "gelu_new"
    if activation not in (None, "gelu") or dropout or norm_eps != 1e-5 or init_std != 0.02:
        raise ConfigError(
            "model.nanogpt=true fixes model.activation=gelu, model.dropout=0, model.norm_eps=1e-5 and "
            "model.init_std=0.02; drop those overrides or set model.nanogpt=false."
        )
    return "gelu"


def _gpt2_config(n_layer, n_embd, n_head, context, dropout, activation, norm_eps, common):
    from transformers import GPT2Config

    drops = {"resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout}
    return GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=context, activation_function=activation,
        layer_norm_epsilon=norm_eps, **drops, **common,
    )  # fmt: skip


def _llama_config(n_layer, n_embd, n_head, context, dropout, intermediate, n_kv_head, rope_theta, norm_eps, common):
    from transformers import LlamaConfig

    if (n_embd // n_head) % 2:
        raise ConfigError(
            f"model.n_embd={n_embd} over model.n_head={n_head} gives an odd head width, which rotary positions "
            "cannot split in pairs; pick an even n_embd / n_head."
        )
    n_kv_head = n_head if n_kv_head is None else n_kv_head
    if not is_int(n_kv_head) or n_kv_head < 1 or n_head % n_kv_head:
        raise ConfigError(
            f"model.n_kv_head={n_kv_head!r} must divide model.n_head={n_head}; use e.g. model.n_kv_head={n_head}."
        )
    if intermediate is None:  # LLaMA's SwiGLU rule: 2/3 of 4 * width, rounded up to a multiple of 256
        intermediate = 256 * -(-int(8 * n_embd / 3) // 256)
    if not is_int(intermediate) or intermediate < 1:
        raise ConfigError(
            f"model.intermediate_size={intermediate!r} must be a positive integer; use null for LLaMA's rule."
        )
    return LlamaConfig(
        num_hidden_layers=n_layer, hidden_size=n_embd, num_attention_heads=n_head, num_key_value_heads=n_kv_head,
        intermediate_size=intermediate, max_position_embeddings=context, attention_dropout=dropout,
        rms_norm_eps=norm_eps, rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)}, **common,
    )  # fmt: skip


def _check_loaded(model, path, family, n_layer, n_embd, n_head, vocab_size, context) -> None:
    """Refuse a loaded model whose family or shape differs from the config's (None: not checked)."""
    config = model.config
    held = {
        "family": config.model_type, "n_layer": config.num_hidden_layers, "n_embd": config.hidden_size,
        "n_head": config.num_attention_heads, "vocab_size": config.vocab_size,
        "context": config.n_positions if config.model_type == "gpt2" else config.max_position_embeddings,
    }  # fmt: skip
    asked = {"family": family, "n_layer": n_layer, "n_embd": n_embd, "n_head": n_head}
    asked |= {"vocab_size": vocab_size, "context": context}
    wrong = [key for key, value in asked.items() if value is not None and value != held[key]]
    if wrong:
        saved = ", ".join(f"{key}={held[key]}" for key in wrong)
        want = ", ".join(f"model.{key}={asked[key]}" for key in wrong)
        raise ConfigError(
            f"model.checkpoint_path={path} holds a model with {saved}, not {want}; set those keys to the saved "
            "values or point it at a matching folder."
        )
