"""Decoding a causal language model (:mod:`.causal_lm`): greedy or seeded sampling, with or without the KV cache.

Our own loop rather than transformers' ``generate``: it is a dozen lines, its randomness is one ``torch.Generator``
(the same seed gives the same text, whatever transformers' sampling internals do across versions), and it keeps
going past the model's context the way nanoGPT's ``sample.py`` does: each step then re-reads the last ``context``
tokens (a sliding window cannot reuse the cache, whose positions would shift), so from there on the cached and the
uncached loops compute the very same thing. Within the context the cached loop feeds one token per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from stackwise_bench.errors import ConfigError
from stackwise_bench.nn.lm_models import context_of


@dataclass(frozen=True)
class Decoded:
    """One completion: the new token ids and why it stopped (``length``: ``max_new_tokens``; ``eos``: end of text)."""

    ids: list[int]
    stopped: str


@torch.inference_mode()
def generate_ids(
    model: nn.Module,
    prompt: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    vocab_size: int | None = None,
    eos_token_id: int | None = None,
) -> Decoded:
    """Continue ``prompt`` by up to ``max_new_tokens`` tokens.

    Args:
        model: A transformers causal LM (or a peft wrapper of one); put in eval mode for the call.
        prompt: Token ids, at least one.
        temperature: 0: greedy (the most likely token); else the logits are divided by it before sampling.
        top_k: Sample among the ``top_k`` most likely tokens only (None: all).
        generator: The sampling's random source (on the model's device); None: the global RNG.
        use_cache: Reuse the keys and values of earlier positions (the same tokens either way).
        vocab_size: The tokenizer's ids: a model with a larger (padded) vocabulary never emits the others.
        eos_token_id: Stop after this token (GPT-2's ``<|endoftext|>``); None: run to ``max_new_tokens``.
    """
    if not prompt:
        raise ConfigError("prompt= encodes to no token; give a prompt of at least one character.")
    device = next(model.parameters()).device
    context = context_of(model)
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    past, new, stopped = None, [], "length"
    cache_key = _cache_argument(model)
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            fits = ids.shape[1] <= context  # past the context the window slides: no cache can serve it
            if use_cache and fits and past is not None:
                out = model(input_ids=ids[:, -1:], **{cache_key: past}, use_cache=True)
            else:
                out = model(input_ids=ids[:, -context:], use_cache=use_cache and fits)
            past = getattr(out, cache_key, None) if use_cache and fits else None
            token = _next_token(out.logits[:, -1, :].float(), temperature, top_k, generator, vocab_size)
            ids = torch.cat([ids, token.view(1, 1)], dim=1)
            new.append(int(token))
            if eos_token_id is not None and new[-1] == eos_token_id:
                stopped = "eos"
                break
    finally:
        model.train(was_training)
    return Decoded(new, stopped)


def _cache_argument(model: nn.Module) -> str:
    """The forward argument (and output field) that carries the KV cache: ``cache`` from transformers 5.x on,
    ``past_key_values`` before (5.x still takes it, with a deprecation warning)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _next_token(logits: torch.Tensor, temperature: float, top_k: int | None, generator, vocab_size) -> torch.Tensor:
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits[..., vocab_size:] = -float("inf")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).view(-1)
