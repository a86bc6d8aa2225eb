"""What a training run needs of a causal language model beyond building it (:mod:`.causal_lm`): the checks against
its data, its LoRA adapters with the family's default targets, and the shape the run record keeps.

transformers is imported by :mod:`.causal_lm` only when a model is built; this module imports none of it.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from stackwise_bench.errors import ConfigError
from stackwise_bench.nn.causal_lm import FAMILIES, lora_targets

LM_TARGET = "stackwise_bench.nn.causal_lm.build_named"  # conf/model/{gpt_*,llama_*}.yaml's _target_


def is_causal_lm(model: nn.Module) -> bool:
    """A GPT-2 or LLaMA from transformers (or a peft wrapper of one)."""
    return getattr(getattr(model, "config", None), "model_type", None) in FAMILIES


def context_of(model: nn.Module) -> int:
    """The longest window the model reads: GPT-2's position table, LLaMA's ``max_position_embeddings``."""
    config = model.config
    return config.n_positions if config.model_type == "gpt2" else config.max_position_embeddings


def check_fits(model: nn.Module, name: str, tokenizer: str, vocab_size: int, seq_len: int) -> None:
    """Refuse, in one sentence, a model whose vocabulary is smaller than the tokenizer's or whose context is
    shorter than ``dataset.seq_len`` (checked again here for a model loaded from ``model.checkpoint_path``)."""
    held = model.config.vocab_size
    if held < vocab_size:
        raise ConfigError(
            f"model.vocab_size={held} is smaller than the {vocab_size} ids of dataset.tokenizer={tokenizer} "
            f"(model={name} would meet ids it has no embedding for); set model.vocab_size=null to take the "
            "tokenizer's."
        )
    context = context_of(model)
    if seq_len > context:
        raise ConfigError(
            f"dataset.seq_len={seq_len} is beyond model={name}'s context of {context} tokens; use "
            f"dataset.seq_len<={context} or a larger model.context."
        )


def check_export_tokenizer(checkpoint_path, tokenizer: dict) -> None:
    """A folder that ``evaluate export=`` wrote records the tokenizer its embeddings were trained with
    (``stackwise_bench.json``): another one with the same vocabulary size (a BPE trained on other text) would train
    on embeddings whose ids mean other strings, silently. Folders from elsewhere record nothing and pass."""
    record = Path(str(checkpoint_path or "")).expanduser() / "stackwise_bench.json"
    if not checkpoint_path or not record.is_file():
        return
    saved = json.loads(record.read_text()).get("tokenizer") or {}
    if saved.get("sha256") and saved["sha256"] != tokenizer.get("sha256"):
        raise ConfigError(
            f"model.checkpoint_path={checkpoint_path} was trained with the {saved.get('name')} tokenizer "
            f"(sha256 {saved['sha256'][:12]}), not this run's {tokenizer.get('name')} "
            f"({tokenizer.get('sha256', '')[:12]}); "
            f"set dataset.tokenizer={saved.get('name')} (for bpe: the same corpus and dataset.bpe_vocab_size)."
        )


def lm_shape(model: nn.Module) -> dict:
    """summary.json's ``params`` shape keys for a language model: no classification head, width and depth."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"head": None, "embed_dim": base.config.hidden_size, "depth": base.config.num_hidden_layers}


def default_targets(model: nn.Module) -> list[str] | None:
    """The family's LoRA targets (``c_attn``; ``q_proj``, ``v_proj``) of a causal LM, else None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return lora_targets(base) if is_causal_lm(base) else None


def adapt_lm(model: nn.Module, lora: dict, total_steps: int, model_name: str) -> nn.Module:
    """``lora.method``'s adapters on a causal LM with the family's default targets (``lora.target_modules=null``)
    and no head trained in full: the output layer is tied to the token embeddings."""
    from stackwise_bench.nn.lora import apply_lora
    from stackwise_bench.nn.peft_methods import QUANTIZED_METHODS

    method = lora.get("method", "lora")
    if lora["rank"] and method in QUANTIZED_METHODS:
        raise ConfigError(
            f"lora.method={method} quantizes image models' layers and is not wired for language models; use "
            "lora.method=lora (or dora, rslora, ...) on model={model_name}."
        )
    if lora.get("target_modules") is None:
        lora = {**lora, "target_modules": lora_targets(model)}
    lora = {**lora, "head": None}
    return apply_lora(model, **lora, total_steps=max(1, total_steps), model_name=model_name)
