#!/usr/bin/env bash
# Scaling of GPT-2 language models: a ladder of widths x depths (conf/experiment/lm_scaling.yaml), then one model
# over doubling token budgets, each fitted as loss = E + A·x^(−α) with bootstrap intervals on the best validation
# loss (lower is better): x = params.total for the ladder, x = train.tokens (steps x batch x seq_len) for the budgets.
#
#   bash scripts/lm_scaling.sh             # the study: widths 128-512 x depths 2-8 on the plays, GPT-2 tokens (a GPU)
#   QUICK=1 bash scripts/lm_scaling.sh     # offline on a CPU: gpt_micro's shape on bytes, ~2 minutes on 2 cores
set -uo pipefail
quick=()
ladder=()
tokens=(model.n_embd=256 model.n_layer=4 "dataset.train_tokens=2000000,4000000,8000000,16000000")
study=lm_scaling
if [[ "${QUICK:-0}" == 1 ]]; then
  # gpt_micro's context and heads (64 tokens, 4 heads) on byte tokens: widths 32-128 x depths 1-4, 2 seeds,
  # 6 "epochs" of 10 steps (batch 16 x 64 tokens); validation and test on 8,192 tokens each.
  quick=(model.context=64 dataset.tokenizer=byte dataset.seq_len=64 trainer.max_epochs=6 trainer.batch_size=16
         dataset.steps_per_epoch=10 dataset.val_tokens=8192 dataset.test_tokens=8192 seed=1,2)
  ladder=("model.n_embd=32,64,96,128" "model.n_layer=1,2,4")
  tokens=(model.n_embd=64 model.n_layer=2 "dataset.train_tokens=18432,36864,73728,147456")  # 18-144 steps of 16 x 64
  study=lm_scaling_quick
fi
status=0
python -m stackwise_bench.train --multirun experiment=lm_scaling study="$study" "${quick[@]}" "${ladder[@]}" "$@" \
  || status=1
python -m stackwise_bench.train --multirun experiment=lm_scaling study="${study}_tokens" "${quick[@]}" \
  "${tokens[@]}" "$@" || status=1
# Width and depth both set the parameter count: one fit across the whole ladder.
python -m stackwise_bench.analyze runs="multirun/$study" scaling=params.total metric=train.best_val_loss || status=1
python -m stackwise_bench.analyze runs="multirun/${study}_tokens" scaling=train.tokens metric=train.best_val_loss \
  || status=1
exit $status
