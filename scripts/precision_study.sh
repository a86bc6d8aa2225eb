#!/usr/bin/env bash
# Precision study: a ViT on CIFAR-10 at 224 px, basic vs extended augmentation x fp32 vs fp16,
# 3 seeds per cell (presets conf/experiment/{BaseFP32,AugmFP32,BaseFP16,AugmFP16}.yaml), then one report.
#
#   bash scripts/precision_study.sh                  # the study (needs CIFAR-10 under data/ and a GPU)
#   QUICK=1 bash scripts/precision_study.sh          # offline smoke run in about a minute on a CPU
#   bash scripts/precision_study.sh dataset.root=/data/cifar   # extra overrides go to every cell
#
# Relaunching skips finished jobs and resumes interrupted ones.
set -uo pipefail
quick=()
suffix=""
if [[ "${QUICK:-0}" == 1 ]]; then
  quick=(dataset=digits model=vit_tiny_p4 model.img_size=16 model.pretrained=false trainer.max_epochs=1 seed=42,123)
  suffix="_quick"
fi
status=0
runs=()
for cell in BaseFP32 AugmFP32 BaseFP16 AugmFP16; do
  python -m stackwise_bench.train --multirun experiment="$cell" study="$cell$suffix" "${quick[@]}" "$@" || status=1
  runs+=("multirun/$cell$suffix")
done
python -m stackwise_bench.analyze "runs=[$(IFS=,; echo "${runs[*]}")]" baseline=precision=fp32 || status=1
exit $status
