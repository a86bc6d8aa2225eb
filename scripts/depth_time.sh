#!/usr/bin/env bash
# Depth as time vs classical training at equal compute: 5 arms x 3 seeds (conf/experiment/depth_time.yaml), then
# the analysis (accuracy, training FLOPs and wall time per arm; paired tests against the matched classical arm).
#
#   bash scripts/depth_time.sh             # the study: vit_tiny_p4 on CIFAR-10 (data under data/, a GPU)
#   QUICK=1 bash scripts/depth_time.sh     # offline on a CPU: a 4-block micro ViT on digits, 1 -> 2 -> 4 blocks
set -uo pipefail
quick=()
study=depth_time
if [[ "${QUICK:-0}" == 1 ]]; then
  # conf/model/vit_micro_p4.yaml at depth 4 (digits at 8 px, 4 tokens), stacks 1 -> 2 -> 4 over equal thirds,
  # 30 epochs at batch 64 (20 steps each), AdamW 3e-3, growth by copying blocks (init=copy).
  quick=(dataset=digits model=vit_micro_p4 model.depth=4 "regime.stacks=[1,2,4]" trainer.max_epochs=30
         trainer.batch_size=64 optimizer.lr=3e-3 scheduler.warmup_epochs=1)
  study=depth_time_quick
fi
status=0
python -m stackwise_bench.train --multirun experiment=depth_time study="$study" "${quick[@]}" "$@" || status=1
python -m stackwise_bench.analyze runs="multirun/$study" baseline=regime=classical_matched || status=1
exit $status
