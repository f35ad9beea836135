#!/usr/bin/env bash
# Train on one node: NUM_GPUS ranks under the DeepSpeed launcher. On a node without GPUs DeepSpeed's
# CPU accelerator runs NUM_GPUS CPU ranks over gloo (a laptop check of a multi-rank setup).
# The config is checked first (python -m cluster.check): a bad path exits 2 before any rank starts.
#
# Variables (and those of launch/env.sh: REPO_DIR, PYTHON, NUM_GPUS, CPU_THREADS_PER_RANK):
#   MASTER_PORT  rendezvous port (default 29500); give each concurrent job on a node its own
# Arguments: Hydra overrides for train.py.
#
# Example:
#   launch/single_node.sh deepspeed=zero3 model.name_or_path=/models/Qwen2.5-7B-Instruct
#   NUM_GPUS=2 launch/single_node.sh deepspeed=zero3 debug=quick output_dir=outputs/check   # 2 CPU ranks
#   SWEEP=loss.alpha=0,1 LAUNCHER=single_node launch/sweep.sh deepspeed=zero3   # a sweep: one launch per value
set -euo pipefail

MASTER_PORT=${MASTER_PORT:-29500}
# shellcheck source=launch/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
setup_ranks_per_node
# Every path the config names, and a resume against this world size, before any rank starts (exit 2).
"$PYTHON" -m cluster.check --world-size "$NUM_GPUS" "$@"

exec "$PYTHON" -m deepspeed.launcher.runner --num_gpus="$NUM_GPUS" --master_port="$MASTER_PORT" train.py "$@"
