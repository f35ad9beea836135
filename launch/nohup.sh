#!/usr/bin/env bash
# Start a training run in the background, detached from the terminal: it survives logout, its output
# goes to logs/<run>-<timestamp>.log, its process id to logs/<run>-<timestamp>.pid, and when it ends its
# exit status to logs/<run>-<timestamp>.exit (0: finished; 143: stopped by kill; no file: still running).
# The config is checked first, on the terminal (python -m cluster.check): a bad path exits 2, nothing starts.
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
# Did it succeed? cat logs/<run>-<timestamp>.exit
set -euo pipefail

RUN_NAME=${RUN_NAME:-train}
LOG_DIR=${LOG_DIR:-logs}
LAUNCHER=${LAUNCHER:-python}
# shellcheck source=launch/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

case "$LAUNCHER" in
  python) command=("$PYTHON" train.py); check=(--world-size 1) ;;
  single_node) command=(launch/single_node.sh); check=() ;;  # single_node.sh checks its world size itself
  *) echo "LAUNCHER=$LAUNCHER: expected python or single_node" >&2; exit 2 ;;
esac
# A bad path fails here, on the terminal, rather than in the detached run's log (exit 2 with the problems).
"$PYTHON" -m cluster.check "${check[@]}" "$@"

mkdir -p "$LOG_DIR"
stem="$(cd "$LOG_DIR" && pwd)/$RUN_NAME-$(date +%Y%m%d-%H%M%S)"
# A shell that waits for the run and writes its exit status ($0 is the .exit file, "$@" the run). The run
# goes in the background so that a TERM sent to this shell alone is passed on at once, not after the run.
# shellcheck disable=SC2016  # expands in that shell, not here
wait_and_record='"$@" &
run=$!
trap "kill -TERM $run 2>/dev/null" TERM INT
while wait "$run"; status=$?; kill -0 "$run" 2>/dev/null; do :; done
echo "$status" >"$0.tmp" && mv "$0.tmp" "$0"'
# setsid: the run leads its own process group, so one kill of the group stops every rank it started.
setsid nohup bash -c "$wait_and_record" "$stem.exit" "${command[@]}" "$@" >"$stem.log" 2>&1 </dev/null &
echo $! >"$stem.pid"
echo "Started $RUN_NAME (pid $!). Follow it with:"
echo "  tail -f $stem.log"
echo "Its exit status goes to $stem.exit when it ends."
