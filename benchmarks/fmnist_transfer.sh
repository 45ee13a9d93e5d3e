#!/usr/bin/env bash
# Does FCMAE pretraining help on real images? Fashion-MNIST on a CPU (docs/results.md).
#   bash benchmarks/fmnist_transfer.sh [OUT_DIR] [STAGE ...]
# Stages (all by default, in this order; each is resumable, a finished one is a no-op):
#   pretrain  atto at 96 px on the 60k train images (no labels), k-NN + linear probe each epoch
#   probe     k-NN / linear probe of raw pixels, random init and the pretrained encoder
#   finetune  100 and 10 labels per class, from the export and from scratch, 3 seeds each
#   sweep     mask ratio 0.4 / 0.6 / 0.75, SWEEP_STEPS steps each, with the k-NN monitor
#   plot      fmnist_transfer.png + summary.json
# Needs `sudo apt-get install dataset-fashion-mnist` and `pip install 'fcmae[plot]'`.
# Knobs (environment): EPOCHS (3), SWEEP_STEPS (300), FT_LABELS ("100 10"), FT_EPOCHS_100 (10), FT_EPOCHS_10 (40),
#   FT_EXTRA (more fine-tuning overrides, e.g. "optim.lr=1e-3") with FT_TAG (a suffix for their run directories).
set -euo pipefail
OUT="${1:-outputs/fmnist_transfer}"
shift || true
STAGES="${*:-pretrain probe finetune sweep plot}"
HERE="$(cd "$(dirname "$0")" && pwd)"
SIZE=96
EPOCHS="${EPOCHS:-3}"
SWEEP_STEPS="${SWEEP_STEPS:-300}"
COMMON="trainer.device=cpu trainer.progress=log data.img_size=$SIZE"
# The monitor: 100 labelled train images per class, 200 test images per class (2000).
EVAL="eval=knn+linear eval.source=fashion_mnist eval.labels_per_class=100 eval.val_per_class=200 eval.num_workers=1"
PRE="data=fashion_mnist data.batch_size=64 optim.lr=2e-3 schedule.warmup_epochs=0.25 trainer.log_every=50 \
  trainer.vis_every=500 trainer.ckpt_every=200"
EXPORT="$OUT/atto_fmnist_timm.safetensors"

for stage in $STAGES; do
  echo "=== stage $stage ($(date +%T))"
  case "$stage" in
    pretrain)
      fcmae-pretrain $COMMON $PRE $EVAL run_name=fmnist-pretrain trainer.epochs="$EPOCHS" hydra.run.dir="$OUT/pretrain"
      fcmae-export "$OUT/pretrain" --format timm --out "$EXPORT" ;;
    probe)
      python "$HERE/fmnist_probe.py" --size $SIZE --export "$EXPORT" --out "$OUT/probe.json" ;;
    finetune)
      for labels in ${FT_LABELS:-100 10}; do
        if [ "$labels" = 100 ]; then ep="${FT_EPOCHS_100:-10}"; else ep="${FT_EPOCHS_10:-40}"; fi
        for seed in 0 1 2; do
          for init in pretrained scratch; do
            from=""; [ "$init" = pretrained ] && from="model.init_from=$EXPORT"
            fcmae-finetune $COMMON data.source=fashion_mnist data.labels_per_class=$labels data.labels_seed=$seed \
              trainer.seed=$seed trainer.epochs="$ep" eval_every="$ep" data.batch_size=32 trainer.log_every=20 \
              run_name=fmnist-ft hydra.run.dir="$OUT/finetune/labels$labels${FT_TAG:-}-$init-seed$seed" $from ${FT_EXTRA:-}
          done
        done
      done ;;
    sweep)
      # One run directory per value under $OUT/sweep (Hydra multirun).
      fcmae-pretrain -m $COMMON $PRE $EVAL run_name=fmnist-sweep trainer.epochs=1 schedule.warmup_steps=30 \
        trainer.max_steps="$SWEEP_STEPS" model.mask_ratio=0.4,0.6,0.75 \
        hydra.sweep.dir="$OUT/sweep" "hydra.sweep.subdir='mask_ratio=\${model.mask_ratio}'" ;;
    plot)
      python "$HERE/plot_fmnist.py" "$OUT" ;;
    *) echo "unknown stage $stage (pretrain probe finetune sweep plot)" >&2; exit 2 ;;
  esac
done
