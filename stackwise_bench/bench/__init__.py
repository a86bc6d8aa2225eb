"""Performance figures of stackwise_bench, each a ratio measured side by side in one run.

    python -m stackwise_bench.bench               # full budget (~15 min on 2 CPU cores)
    python -m stackwise_bench.bench --quick       # the same figures on a smaller budget (~3 min)
    python -m stackwise_bench.bench --only overhead,pipeline --out bench.json

(``python scripts/benchmark.py`` in a clone runs the same.) It runs from an installed wheel, in any folder.

Prints a table and writes a JSON of every figure (every sample, not only the medians) to ``--out`` (default
``multirun/benchmark/<full|quick>.json`` in the current folder). Shared machines drift, so no figure compares
absolute seconds from different moments: each repetition runs every arm once, in alternating order (A B, B A, ...),
and the table reports the median over repetitions of the per-repetition ratio, with the min-max range next to it.

Modules: ``harness`` (budgets, interleaved arms, ratios, the step clock, the training arms), ``report`` (table,
JSON), ``figures`` (the table of figures), one module per group of figures, ``cli`` (the command).

Figures (goals from issue 5 for a 2-core CPU machine):
  overhead   training img/s of stackwise_bench.train.run ÷ a bare PyTorch loop: same model,
             data, batch, precision, threads and recipe (AdamW, grad clip, cosine LR)   >= 0.97
  pipeline   BatchLoader + BatchAugment ÷ torchvision per-sample PIL DataLoader (2 workers),
             crop + flip + normalise, CIFAR-shaped data                            >= 6x (32 px), >= 2.5x (224 px)
  imagefolder  dataset=imagefolder on synthetic 320x240 JPEGs in 10 class folders (Budget.pipeline_images): the
             cached uint8 memmap through BatchLoader + BatchAugment ÷ torchvision ImageFolder + DataLoader (2 workers,
             per-sample resize, crop, flip, normalise), at 32 and 224 px          >= 5x (32 px);
             and the one-off cache build (s per 1,000 images) ÷ one ImageFolder epoch
  startup    launch -> first optimizer step of the default run ÷ `python -c "import torch"`   <= 1.8
  sweep      4 tiny jobs: wall time with hydra.launcher.n_jobs=1 ÷ with n_jobs=2         >= 1.7
             (also 4 default-sized jobs, and the ceiling a 2-thread job leaves them)
  nanogpt    nanoGPT's own train.py (vendored, unchanged) and stackwise_bench.train on the same token file, shape,
             recipe and steps: tokens/s ratio (median step, fetch included)              >= 1.0
             and the validation loss at equal steps, one scorer for both                 within seed noise
  diagnostics  training img/s (mean step, so the logging steps count) with diagnostics=basic and full
             ÷ diagnostics=none, at their default every_n_steps=50                       basic >= 0.98
  knobs      what channels_last, torch.compile, foreach/fused AdamW, the larger eval batch,
             inference_mode and (GPU) host-resident data with non-blocking copies buy
  deit_augment  augmentation=deit (RandAugment n2 m9 mstd0.5, erasing, mixup/CutMix) ÷ basic: batched pipeline
             img/s at 32 px, the trainer's mixing included
  peft       training img/s of every lora.method ÷ LoRA's at the same rank (8), vit_tiny_p4 with its default targets
             (every block's qkv), AdamW, the method's own loop work (AdaLoRA's penalty and reallocation) included
  int4       a merged QA-LoRA vit_tiny_p4 (every block Linear on the 4-bit grid), batch 1: forward img/s with the
             packed int4 tinygemm kernel (stackwise_bench.quant.int4_kernel) ÷ the dequantized reference path, on
             the CPU and on CUDA where there is one (bfloat16 there)
  gpu        (CUDA only) deit_tiny at 224 and resnet8 at 32: img/s and MFU
  devices    one run on N devices (trainer.devices=N, ddp; fsdp too for transformers) ÷ the same run on 1, through
             ``python -m stackwise_bench.train``: same global batch and steps, train img/s (tokens/s for gpt_micro
             in the full budget), world_size/backend/strategy read back from summary.json, and the largest
             |train/val loss difference| to the 1-device run (<= 1e-4). GPUs (NCCL, deit_tiny at 224 bf16): the
             scaling figure, N = 1, 2, 4, ... up to the GPUs. CPU (gloo processes, vit_micro_p4 on digits, the same
             total threads split between the ranks, N up to min(cores, 4)): it proves the path only.
             ``--devices 1,2,4`` chooses the counts.
"""
