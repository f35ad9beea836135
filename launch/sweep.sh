#!/usr/bin/env bash
# A sweep: one run per value of one setting, each launched on its own, into <SWEEP_DIR>/<key>_<value> (not
# Hydra's <key>=<value>: an "=" in output_dir= would need quoting through every launcher).
# `python train.py -m key=a,b` runs a sweep's jobs one after another in one process, which suits a single
# process; a multi-rank launch cannot restart its process group between jobs (train.py refuses `-m` there),
# so under DeepSpeed, torchrun or Slurm each value is its own launch.
#
# Variables (and those of launch/env.sh):
#   SWEEP      key=v1,v2,...  the setting and its values (required); values must not contain commas
#   LAUNCHER   python: one process (default); single_node: launch/single_node.sh; slurm: one sbatch job of
#              launch/slurm.sbatch per value (they run when Slurm schedules them; requeue-safe as usual)
#   SWEEP_DIR  where the runs go (default outputs/sweep-<key>)
# Arguments: Hydra overrides shared by every run (not output_dir: each run's is set here).
# Exit status: 0 when every run finished (or was submitted), else 1 after trying them all.
#
# Examples:
#   SWEEP=loss.alpha=0,0.5,1 launch/sweep.sh debug=quick
#   SWEEP=loss.alpha=0,1 LAUNCHER=single_node launch/sweep.sh deepspeed=zero3 experiment=qwen2_5_7b_zero3
#   mkdir -p logs && SWEEP=training.learning_rate=1e-5,2e-5 LAUNCHER=slurm launch/sweep.sh deepspeed=zero3
set -euo pipefail

LAUNCHER=${LAUNCHER:-python}
if [[ ! "${SWEEP:-}" =~ ^([A-Za-z0-9_.]+)=(.+)$ ]]; then
  echo "sweep.sh: set SWEEP=key=value1,value2,... (got '${SWEEP:-}')" >&2
  exit 2
fi
key=${BASH_REMATCH[1]}
IFS=',' read -r -a values <<< "${BASH_REMATCH[2]}"
# shellcheck source=launch/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
SWEEP_DIR=${SWEEP_DIR:-outputs/sweep-$key}
for argument in "$@"; do
  if [[ "$argument" == output_dir=* || "$argument" == training.output_dir=* ]]; then
    echo "sweep.sh: $argument: each run's output_dir is SWEEP_DIR/${key}_<value>; set SWEEP_DIR instead" >&2
    exit 2
  fi
done

failed=()
for value in "${values[@]}"; do
  run_dir="$SWEEP_DIR/${key}_$value"
  echo "sweep.sh: $key=$value -> $run_dir"
  case "$LAUNCHER" in
    python) "$PYTHON" train.py "$key=$value" "output_dir=$run_dir" "$@" || failed+=("$key=$value") ;;
    single_node) launch/single_node.sh "$key=$value" "output_dir=$run_dir" "$@" || failed+=("$key=$value") ;;
    slurm) OUTPUT_DIR=$run_dir sbatch --job-name="sweep-$key=$value" launch/slurm.sbatch "$key=$value" "$@" \
      || failed+=("$key=$value") ;;
    *) echo "sweep.sh: LAUNCHER=$LAUNCHER: expected python, single_node or slurm" >&2; exit 2 ;;
  esac
done
if (( ${#failed[@]} > 0 )); then
  echo "sweep.sh: ${#failed[@]} of ${#values[@]} runs failed: ${failed[*]}" >&2
  exit 1
fi
echo "sweep.sh: ${#values[@]} runs in $SWEEP_DIR"
