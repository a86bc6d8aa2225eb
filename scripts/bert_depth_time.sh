#!/usr/bin/env bash
# Depth as time for a BERT encoder vs classical training at equal compute (conf/experiment/bert_depth_time.yaml):
# 1. masked-LM pretraining, 5 arms x 5 seeds (a study folder per arm); 2. one GLUE task fine-tuned from each arm's best.pt (the same seed);
# 3. the analyses: masked-token loss and FLOPs per arm (paired tests against classical_matched), then the
#    fine-tunes' GLUE metric per pretraining arm (the column pretrained.regime).
#
#   GLUE_ROOT=/data/glue GLUE_TASK=rte bash scripts/bert_depth_time.sh   # the study: BERT-base, a GPU; GLUE_TASK: cola sst2 mrpc stsb qqp mnli qnli rte wnli
#   QUICK=1 bash scripts/bert_depth_time.sh                               # offline on a CPU: bert_micro on bytes, 1 -> 2 blocks,
#                                                                          # then a SYNTHETIC task in SST-2's layout, generated here
# Extra arguments go to both stages (e.g. trainer.device=cuda).
set -uo pipefail
study=bert_depth_time
model=bert_base
glue_task=${GLUE_TASK:-sst2}
glue_root=${GLUE_ROOT:-}
seeds=1,2,3,4,5
pretrain=()
finetune=()                        # Devlin et al.'s recipe: conf/experiment/bert_depth_time_glue.yaml
if [[ "${QUICK:-0}" == 1 ]]; then
  # bert_micro (2 blocks, width 64) on byte tokens, stacks 1 -> 2 at half the steps, 6 "epochs" of 10 steps of
  # 16 x 64 tokens at lr 2e-3, evaluations on 8,192 tokens; then 8 epochs on a synthetic SST-2-layout task of
  # 1,000 training and 400 dev rows (stackwise_bench/data/text/glue_synthetic.py: NOT GLUE), lr 1e-3 (a byte-level
  # encoder this small needs them to start reading words).
  study=bert_depth_time_quick
  model=bert_micro
  pretrain=(model=bert_micro dataset.tokenizer=byte dataset.seq_len=64 "regime.stacks=[1,2]" "regime.boundaries=[0.5]"
            trainer.max_epochs=6 trainer.batch_size=16 dataset.steps_per_epoch=10 dataset.val_tokens=8192
            dataset.test_tokens=8192 optimizer.lr=2e-3)
  finetune=(trainer.max_epochs=8 optimizer.lr=1e-3 dataset.seq_len=64 dataset.tokenizer=byte)
  glue_task=sst2
  glue_root="multirun/synthetic_glue"
  python -m stackwise_bench.data.text.glue_synthetic "$glue_root" 1000 400 >/dev/null || exit 1
fi
if [[ -z "$glue_root" ]]; then
  echo "GLUE_ROOT is not set: point it at the folder that holds GLUE's task folders (CoLA/, SST-2/, ...)." >&2
  exit 2
fi
status=0
# 1. Masked-LM pretraining, one study per arm (seeds as job folders): every arm at equal FLOPs (classical_matched
#    spends what depth_time spends).
arms=(classical classical_matched depth_time depth_time_prepend depth_time_interleave)
for arm in "${arms[@]}"; do
  python -m stackwise_bench.train --multirun experiment=bert_depth_time study="${study}_${arm}" regime="$arm" \
    seed="$seeds" "${pretrain[@]}" "$@" || status=1
done
# 2. One fine-tune per pretraining run: model.checkpoint_path names the arm's study, each seed fine-tunes from its own
#    run's best.pt (the encoder at its final depth, a new classifier).
for arm in "${arms[@]}"; do
  python -m stackwise_bench.train --multirun experiment=bert_depth_time_glue study="${study}_${glue_task}_${arm}" \
    model="$model" dataset.task="$glue_task" dataset.root="$glue_root" model.checkpoint_path="multirun/${study}_${arm}" \
    seed="$seeds" "${finetune[@]}" "$@" || status=1
done
# 3. The analyses: pretraining (masked-token loss, lower is better), then the fine-tunes by pretraining arm.
pre=""
post=""
for arm in "${arms[@]}"; do pre+="multirun/${study}_${arm},"; post+="multirun/${study}_${glue_task}_${arm},"; done
python -m stackwise_bench.analyze runs="[${pre%,}]" baseline=regime=classical_matched out="multirun/${study}_analysis" \
  || status=1
python -m stackwise_bench.analyze runs="[${post%,}]" baseline=pretrained.regime=classical_matched \
  out="multirun/${study}_${glue_task}_analysis" || status=1
exit $status
