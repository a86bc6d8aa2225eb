#!/usr/bin/env bash
# PEFT on a language model (conf/experiment/lm_peft.yaml): pretrain gpt_mini on half of the plays, export it as a
# save_pretrained folder, fine-tune it on the other half (plays it never saw) with methods x ranks x seeds, plus
# the references a rank axis cannot express (full fine-tuning = rank 0; IA3 has no rank), then the analysis: test
# loss and perplexity against trainable parameters with the Pareto frontier (lower loss is better).
#
#   bash scripts/lm_peft.sh             # the study: gpt_mini (10.7M parameters) on the plays' bytes (a GPU)
#   QUICK=1 bash scripts/lm_peft.sh     # offline on a CPU: gpt_micro pretrained for 200 steps, lora/dora/vera
#
# Extra arguments go to the fine-tuning runs (e.g. trainer.device=cuda), not to the pretraining: a relaunch with
# other arguments must find the same pretrained model.
set -uo pipefail
study=lm_peft
model=gpt_mini
pretrain=(trainer.max_epochs=20 trainer.batch_size=32 dataset.seq_len=256 dataset.steps_per_epoch=250
          optimizer.lr=1e-3)       # nanoGPT's shakespeare_char recipe: 5,000 steps of 32 x 256 bytes
quick=()
grid=()
lr=()                              # the adapters' rate: the preset's
full=(optimizer.lr=3e-4)           # full fine-tuning moves every pretrained weight: a lower rate than the adapters
if [[ "${QUICK:-0}" == 1 ]]; then
  # gpt_micro (4 blocks, width 128, context 64) on bytes: pretrained for 10 "epochs" of 20 steps of 16 x 64,
  # fine-tuned for 4 of 10 at lr 5e-3 (40 steps: adapters need the higher rate to move at all) with lora, dora
  # and vera at ranks 4 and 16, 2 seeds; evaluations on 8,192 tokens.
  model=gpt_micro
  pretrain=(trainer.max_epochs=10 trainer.batch_size=16 dataset.seq_len=64 dataset.steps_per_epoch=20
            optimizer.lr=3e-3 dataset.val_tokens=8192 dataset.test_tokens=8192)
  quick=(model=gpt_micro dataset.seq_len=64 trainer.max_epochs=4 trainer.batch_size=16 dataset.steps_per_epoch=10
         dataset.val_tokens=8192 dataset.test_tokens=8192 seed=1,2)
  lr=(optimizer.lr=5e-3)
  grid=(lora.method=lora,dora,vera lora.rank=4,16)
  full=(optimizer.lr=1e-3)
  study=lm_peft_quick
fi
status=0
folder="multirun/${study}_pretrain"
# 1. Pretraining (a one-job sweep: a relaunch finds it finished and skips it), on plays the fine-tuning never sees.
python -m stackwise_bench.train --multirun study="${study}_pretrain" model="$model" dataset=shakespeare \
  dataset.plays=pretrain dataset.tokenizer=byte optimizer=adamw scheduler=cosine trainer.early_stopping_patience=null \
  "${pretrain[@]}" || exit 1
# 2. Its best checkpoint as a save_pretrained folder (config.json + safetensors), what model.checkpoint_path loads
#    (kept from an earlier launch: evaluate never overwrites an export).
if [[ ! -f "$folder/export/config.json" ]]; then
  python -m stackwise_bench.evaluate checkpoint="$folder/job" export="$folder/export" || exit 1
fi
pretrained="$folder/export"  # relative: hydra runs jobs in this folder
# 3. The fine-tuning grid on the held-out plays, then the references.
python -m stackwise_bench.train --multirun experiment=lm_peft study="$study" model.checkpoint_path="$pretrained" \
  "${quick[@]}" "${grid[@]}" "${lr[@]}" "$@" || status=1
python -m stackwise_bench.train --multirun experiment=lm_peft study="$study" model.checkpoint_path="$pretrained" \
  "${quick[@]}" lora.method=lora lora.rank=0 "${full[@]}" "$@" || status=1
python -m stackwise_bench.train --multirun experiment=lm_peft study="$study" model.checkpoint_path="$pretrained" \
  "${quick[@]}" lora.method=ia3 lora.rank=1 "${lr[@]}" "$@" || status=1
# Cells by method and rank only: the full fine-tuning reference's own learning rate is part of its arm.
python -m stackwise_bench.analyze runs="multirun/$study" baseline=lora.rank=0 "group_by=[lora.method,lora.rank]" \
  || status=1
exit $status
