#!/usr/bin/env bash
# LoRA rank sweep: DeiT-tiny/small x CIFAR-10/100 x full fine-tuning and LoRA ranks 2..32 x 3 seeds
# (conf/experiment/peft_baseline.yaml: 72 runs), then the PEFT report (accuracy vs rank and vs
# trainable parameters, full fine-tuning as the reference).
#
#   bash scripts/peft_baseline.sh                    # the study (CIFAR under data/, pretrained weights, a GPU)
#   QUICK=1 bash scripts/peft_baseline.sh            # offline smoke run on a CPU: vit_tiny_p4 on digits, 1 epoch
set -uo pipefail
quick=()
study=peft_baseline
if [[ "${QUICK:-0}" == 1 ]]; then
  quick=(dataset=digits model=vit_tiny_p4 model.img_size=16 model.pretrained=false lora.rank=0,4,16 seed=42,123
         trainer.max_epochs=1 trainer.batch_size=64 optimizer.lr=1e-3)
  study=peft_baseline_quick
fi
status=0
python -m stackwise_bench.train --multirun experiment=peft_baseline study="$study" "${quick[@]}" "$@" || status=1
python -m stackwise_bench.analyze runs="multirun/$study" baseline=lora.rank=0 || status=1
exit $status
