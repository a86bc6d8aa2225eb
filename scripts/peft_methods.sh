#!/usr/bin/env bash
# Which PEFT method: conf/experiment/peft_methods.yaml (DeiT-Tiny on CIFAR-10, ten methods with a rank x ranks
# {4, 8, 16} x 3 seeds), the references a rank axis cannot express (full fine-tuning = rank 0; IA3 and OFT have
# no rank, so they train once per seed), then the analysis: method x rank table, accuracy against trainable
# parameters with the Pareto frontier (plots/peft_pareto.png), QA-LoRA and QLoRA after merging onto the grid.
#
#   bash scripts/peft_methods.sh                   # the study (CIFAR under data/, pretrained weights, a GPU)
#   QUICK=1 bash scripts/peft_methods.sh           # offline on a CPU: a micro ViT on digits
set -uo pipefail
quick=()
study=peft_methods
if [[ "${QUICK:-0}" == 1 ]]; then
  # As scripts/peft_baseline.sh's quick form: conf/model/vit_micro_p4.yaml widened to 128 with ratio-4 MLPs,
  # digits at 8 px, AdamW 3e-3, batch 32, 20 epochs. No pretrained weights offline: every method adapts a frozen
  # *random* base, so this compares how much each adapter can learn on its own, not how well it fine-tunes.
  # vit_tiny_p4 (12 blocks at width 192) trains at ~58 img/s here: 99 runs would take hours on 2 cores.
  quick=(dataset=digits model=vit_micro_p4 model.embed_dim=128 model.num_heads=4 model.mlp_ratio=4
         trainer.max_epochs=20 trainer.batch_size=32 optimizer.lr=3e-3)
  study=peft_methods_quick
fi
status=0
python -m stackwise_bench.train --multirun experiment=peft_methods study="$study" "${quick[@]}" "$@" || status=1
# References: full fine-tuning, and the two rankless methods (lora.rank=1 only switches them on).
python -m stackwise_bench.train --multirun experiment=peft_methods study="$study" "${quick[@]}" \
  lora.method=lora lora.rank=0 "$@" || status=1
python -m stackwise_bench.train --multirun experiment=peft_methods study="$study" "${quick[@]}" \
  lora.method=ia3,oft lora.rank=1 "$@" || status=1
python -m stackwise_bench.analyze runs="multirun/$study" baseline=lora.rank=0 || status=1
exit $status
