#!/usr/bin/env bash
# Depth as time for a language model vs classical training at equal compute: 5 arms x 5 seeds
# (conf/experiment/lm_depth_time.yaml), then the analysis (test loss, perplexity, bits per byte, training FLOPs
# and FLOPs to a target validation loss per arm; paired tests against the matched classical arm).
#
#   bash scripts/lm_depth_time.sh             # the study: GPT-2 small on the Shakespeare plays, GPT-2 tokens (a GPU)
#   QUICK=1 bash scripts/lm_depth_time.sh     # offline on a CPU: nanoGPT's 4-block gpt_micro on bytes, 1 -> 2 -> 4 blocks
set -uo pipefail
quick=()
study=lm_depth_time
if [[ "${QUICK:-0}" == 1 ]]; then
  # gpt_micro (4 layers, width 128, context 64) on byte tokens, stacks 1 -> 2 -> 4 over equal thirds,
  # 6 "epochs" of 10 random-window steps (batch 16 x 64 tokens), validation and test on 8,192 tokens each.
  quick=(model=gpt_micro dataset.tokenizer=byte dataset.seq_len=64 "regime.stacks=[1,2,4]" trainer.max_epochs=6
         trainer.batch_size=16 dataset.steps_per_epoch=10 dataset.val_tokens=8192 dataset.test_tokens=8192)
  study=lm_depth_time_quick
fi
status=0
python -m stackwise_bench.train --multirun experiment=lm_depth_time study="$study" "${quick[@]}" "$@" || status=1
python -m stackwise_bench.analyze runs="multirun/$study" baseline=regime=classical_matched || status=1
exit $status
