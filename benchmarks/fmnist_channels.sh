#!/usr/bin/env bash
# Fashion-MNIST natively 1-channel vs replicated to 3 (issue #32; docs/results.md): pretraining speed
# and k-NN top-1 of the pretrained encoder, 3 seeds each, on the CPU. Resumable (a finished run is a no-op).
#   bash benchmarks/fmnist_channels.sh [OUT_DIR]        # then: python benchmarks/fmnist_channels.py OUT_DIR
# Knobs (environment): STEPS (300), SIZE (64), SEEDS ("0 1 2").
set -euo pipefail
OUT="${1:-outputs/fmnist_channels}"
STEPS="${STEPS:-300}"
SIZE="${SIZE:-64}"
COMMON="data=fashion_mnist data.img_size=$SIZE data.batch_size=64 data.num_workers=1 data.mean=auto \
  data.stats_images=2000 optim.lr=2e-3 schedule.warmup_steps=30 trainer.epochs=1 trainer.max_steps=$STEPS \
  trainer.device=cpu trainer.progress=log trainer.log_every=25 trainer.vis_every=$STEPS trainer.ckpt_every=$STEPS \
  eval=knn eval.source=fashion_mnist eval.labels_per_class=100 eval.val_per_class=200 eval.num_workers=1"
for seed in ${SEEDS:-0 1 2}; do
  for chans in 1 3; do
    if [ "$chans" = 1 ]; then how="data.channels=grey model.in_chans=1"; else how="data.channels=rgb"; fi
    echo "=== ${chans}-channel seed $seed ($(date +%T))"
    fcmae-pretrain $COMMON $how trainer.seed="$seed" run_name=fmnist-ch"$chans" \
      hydra.run.dir="$OUT/ch$chans-seed$seed"
  done
done
