#!/usr/bin/env bash
# Multi-GPU pretraining with torchrun. Hydra overrides pass through.
#   single node, 8 GPUs:   launch/torchrun.sh 8 experiment=in1k_fcmae model=convnextv2_base data.root=/data/imagenet/train
#   CPU smoke test (gloo): launch/torchrun.sh 2 trainer.device=cpu trainer.max_steps=4 data.img_size=64
#   multi-node: set NNODES, NODE_RANK, MASTER_ADDR (and MASTER_PORT) on every node, then the same command.
set -euo pipefail
NPROC="${1:?usage: launch/torchrun.sh NPROC_PER_NODE [hydra overrides...]}"
shift
exec torchrun \
  --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" \
  --nproc_per_node="$NPROC" -m fcmae.pretrain "$@"
