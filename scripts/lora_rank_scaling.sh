#!/usr/bin/env bash
# How test error falls with LoRA rank, with intervals: ranks 1-32 x 5 seeds, then the scaling fit
# error = E + A·rank^(−α) (Huber in log space, multi-start L-BFGS, 1,000 seed-bootstrap refits).
#
#   bash scripts/lora_rank_scaling.sh   # offline, on a CPU: 30 runs of a micro ViT on digits (13.5 min, n_jobs=1, 2 cores)
#
# The model is the QUICK peft_baseline one (conf/model/vit_micro_p4.yaml widened to 128, ratio-4 MLPs): LoRA
# adapts a frozen *random* base through its qkv adapters and the head (no pretrained weights offline).
# Rank 0 (full fine-tuning) is left out: it has no logarithm. Measured 2026-11-29 on the 2-core dev VM
# (n_jobs=1): alpha 0.49 [0.31, 0.80], E 1.95 [0, 3.80] points, A 9.3 [6.7, 11.1] points.
set -uo pipefail
status=0
python -m stackwise_bench.train --multirun experiment=peft_baseline study=lora_rank_scaling dataset=digits \
  model=vit_micro_p4 model.embed_dim=128 model.num_heads=4 model.mlp_ratio=4 \
  lora.rank=1,2,4,8,16,32 seed=42,123,456,789,1011 \
  trainer.max_epochs=30 trainer.early_stopping_patience=null optimizer.lr=3e-3 "$@" || status=1
python -m stackwise_bench.analyze runs=multirun/lora_rank_scaling scaling=lora.rank aggregate=iqm || status=1
exit $status
