#!/usr/bin/env bash
# Start a training run in the background, detached from the terminal: it survives logout, its output
# goes to logs/<run>-<timestamp>.log and its process id to logs/<run>-<timestamp>.pid.
#
# Variables (and REPO_DIR, PYTHON of launch/env.sh):
#   RUN_NAME  prefix of the log and PID files (default train)
#   LOG_DIR   where they go, relative to the repo root (default logs)
#   LAUNCHER  python: one process (default); single_node: launch/single_node.sh, every local GPU
# Arguments: Hydra overrides for train.py.
#
# Example:
#   RUN_NAME=ce launch/nohup.sh loss.type=ce output_dir=outputs/ce
#   LAUNCHER=single_node launch/nohup.sh deepspeed=zero3
# Stop it: kill -- -"$(cat logs/<run>-<timestamp>.pid)"   (the minus: every process of the run)
set -euo pipefail

RUN_NAME=${RUN_NAME:-train}
LOG_DIR=${LOG_DIR:-logs}
LAUNCHER=${LAUNCHER:-python}
# shellcheck source=launch/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

case "$LAUNCHER" in
  python) command=("$PYTHON" train.py) ;;
  single_node) command=(launch/single_node.sh) ;;
  *) echo "LAUNCHER=$LAUNCHER: expected python or single_node" >&2; exit 2 ;;
esac

mkdir -p "$LOG_DIR"
stem="$(cd "$LOG_DIR" && pwd)/$RUN_NAME-$(date +%Y%m%d-%H%M%S)"
# setsid: the run leads its own process group, so one kill of the group stops every rank it started.
setsid nohup "${command[@]}" "$@" >"$stem.log" 2>&1 </dev/null &
echo $! >"$stem.pid"
echo "Started $RUN_NAME (pid $!). Follow it with:"
echo "  tail -f $stem.log"
