"""Zero-shot evaluation of a causal language model (the project's GPT-2 / LLaMA builds, any of its tokenizers) on
LAMBADA, HellaSwag and PIQA read from their released files, scored as EleutherAI's lm-evaluation-harness does.

- ``lambada``: the release's jsonl (``{"text": ...}``, e.g. ``lambada_test.jsonl`` of LAMBADA-OpenAI). The context
  is the text up to its last space and the target the last word with its space (``" " + word``). ``acc``: the
  greedy decoding of the target's tokens is the target (every target token is the argmax); ``ppl``: exp of minus
  the mean log-likelihood of the targets, a per-word perplexity of the last word.
- ``hellaswag``: the release's jsonl (``ctx_a``, ``ctx_b``, ``activity_label``, ``endings``, ``label``; a row with
  ``ctx`` alone is read too). The query is ``activity_label + ": " + ctx_a + " " + ctx_b.capitalize()`` after the
  harness's clean-up of WikiHow's ``[title]`` / ``[...]`` markup; each ending is a continuation after a space.
- ``piqa``: the release's ``*.jsonl`` (``goal``, ``sol1``, ``sol2``) with its labels either in a ``label`` field or
  in the separate ``*-labels.lst`` file (one 0/1 per line); the query is ``"Question: {goal}\\nAnswer:"``.

Multiple choice picks the continuation of highest log-likelihood (``acc``) and of highest log-likelihood per
*character* of the choice text, the delimiting space left out (``acc_norm``, the harness's normalisation, which
does not depend on the tokenizer); ties go to the first choice. A continuation's log-likelihood is the sum of its
tokens' log-probabilities given everything before them. The context is encoded alone and the continuation as the
tokens that ``encode(context + continuation)`` adds after it (the harness's pairing). What exceeds the model's
window loses its oldest context tokens (the harness's left truncation); a continuation longer than the window itself
is scored in consecutive windows, each token given the tokens before it in its window.

Module placement: beside :mod:`stackwise_bench.lm_evaluation` (which may call it), above ``build``; it imports only
the errors and ``nn``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from stackwise_bench.errors import ConfigError
from stackwise_bench.nn.lm_models import context_of

TASKS = ("lambada", "hellaswag", "piqa")
KEY = "zero_shot.path"  # the override that names the task's file (evaluate's key)
LABELS_KEY = "zero_shot.labels"  # PIQA's separate labels file (*-labels.lst)


def read_jsonl(path: str | Path, fields: tuple[str, ...], key: str = KEY) -> list[dict]:
    """The rows of a jsonl file, each refused in one sentence unless it is a JSON object with ``fields``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key}={path} is not a file; point it at the task's released jsonl file.")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines: JSON text may hold a raw U+2028
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"{key}={path} cannot be read ({type(exc).__name__}); point it at the task's released jsonl file."
        ) from exc
    rows = []
    for line, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or any(k not in row for k in fields):
            raise ConfigError(
                f"{key}={path} line {line} is not a JSON object with {', '.join(fields)}; use the task's "
                "released jsonl file."
            )
        rows.append(row)
    if not rows:
        raise ConfigError(f"{key}={path} holds no rows; use the task's released jsonl file.")
    return rows


def read_lambada(path: str | Path, key: str = KEY) -> list[tuple[str, str]]:
    """``(context, " " + last word)`` of every LAMBADA passage."""
    out = []
    for line, row in enumerate(read_jsonl(path, ("text",), key), start=1):
        text = str(row["text"])
        if " " not in text.strip():
            raise ConfigError(f"{key}={path} row {line} has no word before its last one; use LAMBADA's release.")
        context, word = text.rsplit(" ", 1)
        out.append((context, " " + word))
    return out


def _clean(text: str) -> str:
    """lm-evaluation-harness's HellaSwag clean-up (tasks/hellaswag/utils.py: ``preprocess``)."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def read_hellaswag(path: str | Path, key: str = KEY) -> list[tuple[str, list[str], int]]:
    """``(query, endings, gold)`` of every HellaSwag row."""
    out = []
    for line, row in enumerate(read_jsonl(path, ("endings", "label"), key), start=1):
        if "ctx_a" in row and "ctx_b" in row:
            ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
        elif "ctx" in row:
            ctx = row["ctx"]
        else:
            raise ConfigError(f"{key}={path} row {line} has neither ctx_a and ctx_b nor ctx; use HellaSwag's release.")
        query = _clean(f"{row['activity_label']}: {ctx}" if row.get("activity_label") else ctx)
        out.append((query, [_clean(e) for e in row["endings"]], _gold(row["label"], len(row["endings"]), path, line)))
    return out


def read_piqa(path: str | Path, labels_path: str | Path | None = None, key: str = KEY) -> list:
    """``(query, [sol1, sol2], gold)`` of every PIQA row; the labels from ``label`` fields or ``labels_path``."""
    rows = read_jsonl(path, ("goal", "sol1", "sol2"), key)
    if labels_path is not None:
        if not Path(labels_path).expanduser().is_file():
            raise ConfigError(
                f"{LABELS_KEY}={labels_path} is not a file (the labels of {key}={path}); give PIQA's *-labels.lst."
            )
        lines = [t for t in Path(labels_path).expanduser().read_text().splitlines() if t.strip()]
        if len(lines) != len(rows):
            raise ConfigError(
                f"{key}={path} has {len(rows)} rows but its labels file {labels_path} has {len(lines)} lines; use "
                "the labels file released with it."
            )
        labels = lines
    elif all("label" in r for r in rows):
        labels = [r["label"] for r in rows]
    else:
        raise ConfigError(f"{key}={path} has rows without a label; give the release's labels file (*-labels.lst).")
    return [
        (f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], _gold(label, 2, path, i))
        for i, (r, label) in enumerate(zip(rows, labels), start=1)
    ]


def _gold(label, n: int, path, line: int) -> int:
    try:
        gold = int(str(label).strip())
    except ValueError:
        gold = -1
    if not 0 <= gold < n:
        raise ConfigError(f"{KEY}={path} row {line} has label {label!r}, not one of 0..{n - 1}; use the release.")
    return gold


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The context's ids and the ids ``encode(context + continuation)`` adds after them (the harness's pairing)."""
    whole, head = tokenizer.encode(context + continuation), tokenizer.encode(context)
    if whole[: len(head)] != head:  # a merge across the boundary: fall back to encoding both apart
        return head, tokenizer.encode(continuation)
    return head, whole[len(head) :]


@torch.inference_mode()
def loglikelihoods(model, requests: list[tuple[list[int], list[int]]], batch_size: int = 16) -> list[tuple]:
    """``(log-likelihood, greedy)`` of each ``(context ids, continuation ids)``: the continuation's summed
    log-probabilities, and whether each of its tokens is the argmax (module docstring for the window rules)."""
    window, device = context_of(model), next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: list[tuple | None] = [None] * len(requests)
    try:
        fits = []
        for i, (ctx, cont) in enumerate(requests):
            if not ctx or not cont:
                raise ValueError(f"request {i} has an empty context or continuation: nothing to condition or score")
            if len(cont) <= window:
                fits.append(i)
            else:
                results[i] = _rolling(model, ctx + cont, len(ctx), window, device)
        fits.sort(key=lambda i: -len(requests[i][0]) - len(requests[i][1]))  # similar lengths share a batch
        for first in range(0, len(fits), batch_size):
            chunk = fits[first : first + batch_size]
            for i, result in zip(chunk, _batch(model, [requests[i] for i in chunk], window, device)):
                results[i] = result
    finally:
        model.train(was_training)
    return results


def _batch(model, requests, window: int, device) -> list[tuple[float, bool]]:
    """Requests whose continuation fits the window, right-padded into one forward pass (padding after a causal
    position never reaches it)."""
    inputs = [(ctx + cont)[-(window + 1) :][:-1] for ctx, cont in requests]
    width = max(len(x) for x in inputs)
    ids = torch.zeros((len(inputs), width), dtype=torch.long)
    for row, x in enumerate(inputs):
        ids[row, : len(x)] = torch.tensor(x)
    logprobs = F.log_softmax(_logits(model, ids.to(device)).float(), dim=-1).cpu()
    out = []
    for row, ((_, cont), x) in enumerate(zip(requests, inputs)):
        lp = logprobs[row, len(x) - len(cont) : len(x)]
        target = torch.tensor(cont)
        out.append((float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())))
    return out


def _rolling(model, ids: list[int], start: int, window: int, device) -> tuple[float, bool]:
    """A continuation longer than the window: windows of ``window + 1`` ids from the end backwards, each scoring
    the targets not yet scored."""
    total, greedy, end = 0.0, True, len(ids)
    while end > start:
        lo = max(0, end - window - 1)
        x = torch.tensor(ids[lo : end - 1], device=device)[None]
        lp = F.log_softmax(_logits(model, x).float()[0], dim=-1).cpu()
        first = max(start, lo + 1)
        target = torch.tensor(ids[first:end])
        part = lp[first - lo - 1 : end - lo - 1]
        total += float(part.gather(1, target[:, None]).sum())
        greedy &= bool((part.argmax(-1) == target).all())
        end = first
    return total, greedy


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, use_cache=False)
    return out.logits if hasattr(out, "logits") else out


def lambada(model, tokenizer, path: str | Path, batch_size: int = 16) -> dict:
    """LAMBADA's last-word ``acc`` (percent) and ``ppl``, over the rows of ``path``."""
    return lambada_rows(model, tokenizer, read_lambada(path), batch_size)


def lambada_rows(model, tokenizer, rows: list[tuple[str, str]], batch_size: int = 16) -> dict:
    """LAMBADA's last-word ``acc`` (percent) and ``ppl`` of ``(context, " " + word)`` rows."""
    results = loglikelihoods(model, [encode_pair(tokenizer, c, t) for c, t in rows], batch_size)
    lls = [ll for ll, _ in results]
    acc = 100.0 * sum(g for _, g in results) / len(results)
    return {"acc": acc, "ppl": math.exp(-sum(lls) / len(lls)), "n": len(results)}


def multiple_choice(model, tokenizer, examples: list, batch_size: int = 16) -> dict:
    """``acc`` and ``acc_norm`` (percent; module docstring) of ``(query, choices, gold)`` examples."""
    requests = [encode_pair(tokenizer, q, " " + c) for q, choices, _ in examples for c in choices]
    lls = [ll for ll, _ in loglikelihoods(model, requests, batch_size)]
    right = right_norm = at = 0
    for _, choices, gold in examples:
        scores = lls[at : at + len(choices)]
        at += len(choices)
        right += _first_max(scores) == gold
        right_norm += _first_max([s / max(1, len(c)) for s, c in zip(scores, choices)]) == gold
    return {"acc": 100.0 * right / len(examples), "acc_norm": 100.0 * right_norm / len(examples), "n": len(examples)}


def _first_max(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def read_task(task: str, path, labels_path=None) -> list:
    """The examples of ``task`` (:data:`TASKS`) from its file: refused in one sentence before any scoring."""
    if task not in TASKS:
        raise ConfigError(f"zero_shot.task={task} is not a zero-shot task; use one of {', '.join(TASKS)}.")
    if labels_path is not None and task != "piqa":
        raise ConfigError(f"{LABELS_KEY}={labels_path} is PIQA's labels file; drop it for zero_shot.task={task}.")
    if task == "lambada":
        return read_lambada(path)
    if task == "hellaswag":
        return read_hellaswag(path)
    return read_piqa(path, labels_path)


def score(model, tokenizer, task: str, examples: list, batch_size: int = 16) -> dict:
    """``task``'s metrics of the examples :func:`read_task` read: LAMBADA's ``acc`` and ``ppl``, else ``acc`` and
    ``acc_norm``; with ``n``, the number of examples."""
    if task == "lambada":
        return lambada_rows(model, tokenizer, examples, batch_size)
    return multiple_choice(model, tokenizer, examples, batch_size)


def zero_shot(model, tokenizer, task: str, path, labels_path=None, batch_size: int = 16) -> dict:
    """Score ``model`` on ``task`` (:data:`TASKS`) from the file ``path`` (PIQA: labels in ``labels_path`` or rows)."""
    return score(model, tokenizer, task, read_task(task, path, labels_path), batch_size)
