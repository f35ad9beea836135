#!/usr/bin/env bash
# Train on several nodes. Run this script on every node with the same arguments and its own NODE_RANK:
# torchrun's static rendezvous at MASTER_ADDR:MASTER_PORT joins them, and node 0 holds global rank 0
# (which writes the model and metrics). With HOSTFILE set, run it once, on node 0: the DeepSpeed launcher
# starts every host listed there over ssh (pdsh), so each needs the repo and the env at the same path.
# With HOSTFILE and NO_SSH=1, run it on every node with its NODE_RANK instead (the launcher's --no_ssh).
# With NNODES=1 it is a plain single-node torchrun.
#
# Variables (and those of launch/env.sh: REPO_DIR, PYTHON, NUM_GPUS, CPU_THREADS_PER_RANK):
#   NNODES       number of nodes (default 1)
#   NODE_RANK    this node's index, 0 on the MASTER_ADDR node (default 0)
#   MASTER_ADDR  address of node 0 that every node can reach (default 127.0.0.1)
#   MASTER_PORT  rendezvous port on node 0 (default 29500)
#   HOSTFILE     a DeepSpeed hostfile ("node0 slots=8" lines): launch with DeepSpeed instead of torchrun
#   NO_SSH       1: with HOSTFILE, start only this node's ranks (no ssh; NODE_RANK = its line in HOSTFILE)
#   SHUTDOWN_TIMEOUT  seconds torchrun gives its ranks, after forwarding a SIGUSR1/SIGTERM, to save a checkpoint
#                and exit before it kills them (default 300; keep it under Slurm's signal lead time)
# Arguments: Hydra overrides for train.py.
# The config is checked first on every node (python -m cluster.check: paths, and a resume against the
# world size NNODES x NUM_GPUS): a problem exits 2 before any rank starts.
#
# Example (2 nodes of 8 GPUs):
#   node0$ NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/multi_node.sh deepspeed=zero3
#   node1$ NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/multi_node.sh deepspeed=zero3
#   node0$ HOSTFILE=hostfile MASTER_ADDR=node0 launch/multi_node.sh deepspeed=zero3   # every node, over ssh
#   nodeN$ HOSTFILE=hostfile NO_SSH=1 NODE_RANK=N MASTER_ADDR=node0 launch/multi_node.sh deepspeed=zero3   # no ssh
set -euo pipefail

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
HOSTFILE=${HOSTFILE:-}
NO_SSH=${NO_SSH:-0}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-300}
# shellcheck source=launch/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

if [[ -n "$HOSTFILE" ]]; then
  # The world size is the hostfile's slot count: DeepSpeed checks a resume against it in train.py.
  "$PYTHON" -m cluster.check "$@"
  this_node_only=()
  if [[ "$NO_SSH" == 1 ]]; then
    this_node_only=(--no_ssh --node_rank="$NODE_RANK")
  fi
  exec "$PYTHON" -m deepspeed.launcher.runner --hostfile="$HOSTFILE" "${this_node_only[@]}" \
    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" train.py "$@"
fi
setup_ranks_per_node
# Each node checks the paths as it sees them (a shared filesystem that is not mounted shows up here).
"$PYTHON" -m cluster.check --world-size $(( NNODES * NUM_GPUS )) "$@"
# torchrun forwards only TERM, INT, HUP and QUIT by default, and SIGUSR1 (Slurm's warning before the time
# limit) would kill it outright: forward it too, then wait for the ranks' checkpoint (cluster/resilience.py).
# torchrun then exits 1 with a SignalException traceback: the ranks' 75 is in <output_dir>/preempted.json.
# Under Slurm this chain is tested end to end: tests/launch/test_slurm.py.
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2}
export PET_SHUTDOWN_TIMEOUT=${PET_SHUTDOWN_TIMEOUT:-$SHUTDOWN_TIMEOUT}
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" \
  --nproc_per_node="$NUM_GPUS" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" train.py "$@"
