#!/usr/bin/env bash
# Does FCMAE pretraining help? A CPU-sized end-to-end experiment on the built-in
# synthetic classes (docs/results.md): pretrain atto with k-NN monitoring, export,
# fine-tune from the export, fine-tune from random init with the same budget, plot.
#   bash benchmarks/transfer_synthetic.sh [OUT_DIR]      (~20 min on 2 CPU cores)
set -euo pipefail
OUT="${1:-outputs/transfer_synthetic}"
SIZE=128
COMMON="trainer.device=cpu trainer.progress=log data.img_size=$SIZE hydra.run.dir=$OUT"

fcmae-pretrain $COMMON/pretrain run_name=transfer-pretrain eval=knn \
  data.synthetic_images=3072 data.batch_size=32 trainer.epochs=4 optim.blr=8e-3 \
  schedule.warmup_epochs=0.5 trainer.log_every=16 trainer.vis_every=128 trainer.ckpt_every=128

fcmae-export "$OUT/pretrain" --format timm --out "$OUT/atto_pretrained_timm.safetensors"

FT="data.synthetic_images=1024 data.synthetic_val_images=512 data.batch_size=32 trainer.epochs=6 \
  optim.blr=2e-3 optim.layer_decay=0.9 schedule.warmup_epochs=1 model.drop_path_rate=0.1 trainer.log_every=8"
fcmae-finetune $COMMON/finetune_pretrained run_name=transfer-ft-pretrained $FT \
  model.init_from="$OUT/atto_pretrained_timm.safetensors"
fcmae-finetune $COMMON/finetune_scratch run_name=transfer-ft-scratch $FT

python "$(dirname "$0")/plot_transfer.py" "$OUT"
