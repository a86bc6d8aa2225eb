"""The PEFT methods ``lora.method`` selects, each as the peft config that builds it.

One function per method turns the shared knobs (rank, alpha, dropout, targets, head) and the method's
own section of ``conf/lora/default.yaml`` into a peft config. ``lora.rank`` keeps its meaning (the
adapter's rank r) wherever the method has one; IA³ and OFT have none (:data:`RANKLESS`): any rank > 0
switches them on. Every method trains the classification head in full next to its adapters.

peft is imported inside the functions: it pulls in transformers (~2-4 s), which a full fine-tuning run
never needs.
"""

from __future__ import annotations

import math

from stackwise_bench.errors import ConfigError

PEFT_METHODS = ("lora", "dora", "rslora", "pissa", "adalora", "loha", "lokr", "ia3", "vera", "oft")
QUANTIZED_METHODS = ("qalora", "qlora")  # our own layers (stackwise_bench.quant.qalora): peft's use_qalora is GPTQ-only
METHODS = PEFT_METHODS + QUANTIZED_METHODS
RANKLESS = ("ia3", "oft")  # no rank: lora.rank > 0 only switches them on
INPUT_DROPOUT = ("lora", "dora", "rslora", "pissa", "adalora", "vera", "qalora", "qlora")  # use lora.dropout

# What to change when peft cannot build a method on a model, by method (a generic hint otherwise).
FIXES = {
    "vera": "VeRA adapts nn.Linear layers only: use a ViT/DeiT model or another lora.method",
    "pissa": "PiSSA initialises from an SVD of nn.Linear weights: use a ViT/DeiT model or lora.method=lora",
    "oft": "set lora.oft.block_size to a divisor of every adapted layer's input size, or use another lora.method",
}


def peft_config(method: str, rank: int, alpha: float, dropout: float, targets, head, options: dict, total_step=None):
    """The peft config of ``method`` (one of :data:`PEFT_METHODS`).

    Args:
        rank: The adapter rank (> 0); ignored by the rankless methods.
        alpha: The scaling numerator, already defaulted (2 * rank); LoRA-family scaling is alpha / r
            (rsLoRA: alpha / sqrt(r); LoHa/LoKr: alpha / r on their factors).
        targets: A regex (str, full match) or a list of module names.
        head: Module trained in full (peft ``modules_to_save``), or None.
        options: The method's own knobs (``cfg.lora.<method>``), possibly empty.
        total_step: AdaLoRA's schedule length: the trainer's planned number of optimizer steps.
    """
    import peft

    save = [head] if head is not None else None
    common = dict(target_modules=targets, modules_to_save=save)
    lora_like = dict(r=rank, lora_alpha=alpha, lora_dropout=dropout, **common)
    if method == "lora":
        return peft.LoraConfig(**lora_like)
    if method == "dora":
        return peft.LoraConfig(**lora_like, use_dora=True)
    if method == "rslora":
        return peft.LoraConfig(**lora_like, use_rslora=True)
    if method == "pissa":
        niter = options.get("niter")
        return peft.LoraConfig(**lora_like, init_lora_weights="pissa" if niter is None else f"pissa_niter_{niter}")
    if method == "adalora":
        init_r = options.get("init_r") or math.ceil(1.5 * rank)
        tinit, tfinal = adalora_schedule(options, total_step)
        return peft.AdaLoraConfig(
            init_r=init_r,
            target_r=rank,
            lora_alpha=alpha,
            lora_dropout=dropout,
            total_step=total_step,
            tinit=tinit,
            tfinal=tfinal,
            deltaT=options.get("delta_t", 10),
            beta1=options.get("beta1", 0.85),
            beta2=options.get("beta2", 0.85),
            orth_reg_weight=options.get("orth_reg_weight", 0.5),
            **common,
        )
    if method in ("loha", "lokr"):
        kind = peft.LoHaConfig if method == "loha" else peft.LoKrConfig
        extra = {}
        if method == "lokr":
            extra = dict(
                decompose_both=options.get("decompose_both", False), decompose_factor=options.get("factor", -1)
            )
        return kind(
            r=rank,
            alpha=alpha,
            rank_dropout=options.get("rank_dropout", 0.0),
            module_dropout=options.get("module_dropout", 0.0),
            **extra,
            **common,
        )
    if method == "ia3":
        return peft.IA3Config(feedforward_modules=[], **common)  # scale each adapted layer's outputs
    if method == "vera":
        return peft.VeraConfig(
            r=rank,
            vera_dropout=dropout,
            d_initial=options.get("d_initial", 0.1),
            projection_prng_key=options.get("projection_seed", 0),
            save_projection=True,  # the shared random matrices go into the checkpoint: resume needs no seed
            **common,
        )
    if method == "oft":
        return peft.OFTConfig(
            r=0,
            oft_block_size=options.get("block_size", 8),
            coft=options.get("coft", False),
            eps=options.get("eps", 6e-5),
            module_dropout=options.get("module_dropout", 0.0),
            **common,
        )
    raise ValueError(f"not a peft method: {method}")


def adalora_schedule(options: dict, total_step: int) -> tuple[int, int]:
    """AdaLoRA's ``(tinit, tfinal)`` in steps: the configured ones, or 10% and 20% of ``total_step`` when null.

    Raises:
        ConfigError: The schedule leaves no steps to prune ranks in (peft needs ``tinit < total_step - tfinal``).
    """
    tinit = options.get("tinit")
    tfinal = options.get("tfinal")
    tinit = int(tinit) if tinit is not None else total_step // 10
    tfinal = int(tfinal) if tfinal is not None else total_step // 5
    if not tinit < total_step - tfinal:
        raise ConfigError(
            f"lora.adalora.tinit={tinit} and lora.adalora.tfinal={tfinal} leave no steps to reallocate ranks in a "
            f"run of {total_step} optimizer steps (AdaLoRA needs tinit < {total_step} - tfinal); lower them, e.g. "
            f"lora.adalora.tinit={total_step // 10} lora.adalora.tfinal={total_step // 5}, or train longer."
        )
    return tinit, tfinal
