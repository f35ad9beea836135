# shellcheck shell=bash
# Sourced by the other launch/ scripts, not run: the settings they share.
#
# Variables:
#   REPO_DIR              repository root (default: this file's parent). The scripts run from there, so
#                         relative paths in overrides (output_dir=, data.sources=) start at the repo root.
#   PYTHON                interpreter with the project installed (default: .venv/bin/python, else python3)
#   NUM_GPUS              ranks per node (default: every GPU the node gives this job; 2 CPU ranks without one)
#   CPU_THREADS_PER_RANK  threads per rank on a node without GPUs (default: cores / NUM_GPUS)

REPO_DIR=${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
cd "$REPO_DIR" || exit
if [[ -x "$REPO_DIR/.venv/bin/python" ]]; then
  PYTHON=${PYTHON:-$REPO_DIR/.venv/bin/python}
else
  PYTHON=${PYTHON:-python3}
fi

# Sets NUM_GPUS, and on a node without GPUs the per-rank thread count: DeepSpeed's CPU accelerator and
# gloo then run NUM_GPUS CPU ranks, and ranks that each use every core thrash (about 3x slower on 2 cores).
setup_ranks_per_node() {
  local gpus
  # torch, not nvidia-smi: it sees only the GPUs CUDA_VISIBLE_DEVICES (or Slurm) gives this job.
  gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
  if (( gpus > 0 )); then
    NUM_GPUS=${NUM_GPUS:-$gpus}
  else
    NUM_GPUS=${NUM_GPUS:-2}
    local threads=$(( $(nproc) / NUM_GPUS ))
    export OMP_NUM_THREADS=${CPU_THREADS_PER_RANK:-$(( threads > 0 ? threads : 1 ))}
  fi
}
