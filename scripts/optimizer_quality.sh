#!/usr/bin/env bash
# SGD vs AdamW on the small ResNet, CIFAR-10 (90/10 split), no LR schedule, evaluated every 10 epochs,
# 3 seeds (conf/experiment/optimizer_quality.yaml), then the paired comparison against SGD.
#
#   bash scripts/optimizer_quality.sh                # the study (CIFAR-10 under data/)
#   QUICK=1 bash scripts/optimizer_quality.sh        # offline smoke run on a CPU: digits, 4 epochs
set -uo pipefail
quick=()
study=optimizer_quality
if [[ "${QUICK:-0}" == 1 ]]; then
  quick=(dataset=digits trainer.max_epochs=4 trainer.eval_every=2 trainer.batch_size=64 seed=42,123)
  study=optimizer_quality_quick
fi
status=0
python -m stackwise_bench.train --multirun experiment=optimizer_quality study="$study" "${quick[@]}" "$@" || status=1
python -m stackwise_bench.analyze runs="multirun/$study" baseline=optimizer=sgd metric=test.top1 || status=1
exit $status
