#!/usr/bin/env bash
# A Slurm cluster across the nodes of scripts/netns_nodes.sh: slurmctld on node0, one slurmd per node (each with its
# own NodeName, address and hostname), and munged, all inside the nodes' namespaces, so a job crosses a real network
# stack: `sbatch --nodes=2 launch/slurm.sbatch` gets SLURM_JOB_NODELIST=node[0-1] and its ranks meet at node0's
# address. Config, keys, state, pid files and logs live in DIR (the nodes share the disk, as a cluster's nodes
# share a filesystem); the munge socket is a file there, which every namespace reaches. Needs root, Slurm and munge
# (scripts/ci_slurm.sh installs them), and the nodes made first. Nothing is started in the machine's own namespace,
# so `scripts/netns_nodes.sh destroy` ends whatever `stop` did not.
#
# Commands:
#   start DIR        write DIR/slurm.conf for the nodes that exist (NODE_CPUS each) and start the daemons
#   client CMD ...   run a Slurm client command on node0 with this cluster's SLURM_CONF (DIR from SLURM_TWO_NODES_DIR)
#   stop DIR         stop the daemons started by `start DIR` (by their pid files) and wait for them to end
#
# Variables:
#   NETNS_PREFIX, NETNS_SUBNET  the set of nodes (as for scripts/netns_nodes.sh)
#   NODE_CPUS                   CPUs each node declares (default: this machine's cores shared between the nodes)
#   PARTITION                   the partition's name (default nodes)
#   SLURMD_TIMEOUT              seconds without an answer before a node is DOWN (default 20; Slurm's is 300)
#
# Example (from the repo root, as root):
#   scripts/netns_nodes.sh create 2 && scripts/slurm_two_nodes.sh start /tmp/slurm2
#   mkdir -p logs && SLURM_TWO_NODES_DIR=/tmp/slurm2 NUM_GPUS=1 scripts/slurm_two_nodes.sh client \
#     sbatch --nodes=2 --gpus-per-node=0 --partition=nodes --time=60 launch/slurm.sbatch deepspeed=zero3 debug=quick
#   SLURM_TWO_NODES_DIR=/tmp/slurm2 scripts/slurm_two_nodes.sh client squeue
#   scripts/slurm_two_nodes.sh stop /tmp/slurm2 && scripts/netns_nodes.sh destroy
set -euo pipefail

NETNS_PREFIX=${NETNS_PREFIX:-dftnet}
NETNS_SUBNET=${NETNS_SUBNET:-10.231.0}
PARTITION=${PARTITION:-nodes}
SLURMD_TIMEOUT=${SLURMD_TIMEOUT:-20}
NETNS=$(dirname "$0")/netns_nodes.sh
export NETNS_PREFIX NETNS_SUBNET

usage() {
  echo "usage: scripts/slurm_two_nodes.sh start DIR | client CMD [ARG...] | stop DIR" >&2
  exit 2
}

node_count() {
  ip netns list | awk '{print $1}' | grep -cE "^${NETNS_PREFIX}-node[0-9]+$" || true
}

write_conf() {
  local dir=$1 count=$2 cpus=$3
  cat > "$dir/slurm.conf" <<CONF
ClusterName=netnsnodes
SlurmctldHost=node0($NETNS_SUBNET.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job's restart (by cred_expire + 1 s); the scheduler looks often.
AuthInfo=socket=$dir/munge.sock,cred_expire=10
SchedulerParameters=sched_interval=1,bf_interval=1
# A node that answers no ping for this long is DOWN and its jobs NODE_FAIL (requeued if they allow it: slurm.sbatch
# does); Slurm's default is 300 s.
SlurmdTimeout=$SLURMD_TIMEOUT
# A job that ends (a NODE_FAIL included) gets SIGTERM, then SIGKILL this long after: ranks blocked in a collective with
# a lost node do not end on SIGTERM, and the job's requeue waits for them (Slurm's default is 30 s).
KillWait=5
StateSaveLocation=$dir/state
# One slurmd per node on one disk: %n (the slurmd's NodeName) keeps their files apart.
SlurmdSpoolDir=$dir/spool-%n
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmdLogFile=$dir/slurmd-%n.log
SlurmctldPidFile=$dir/slurmctld.pid
SlurmctldLogFile=$dir/slurmctld.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
CONF
  local nodes="node0"
  for (( i = 0; i < count; i++ )); do
    echo "NodeName=node$i NodeAddr=$NETNS_SUBNET.$(( i + 1 )) NodeHostname=node$i CPUs=$cpus State=UNKNOWN" \
      >> "$dir/slurm.conf"
    if (( i > 0 )); then
      nodes+=",node$i"
    fi
  done
  echo "PartitionName=$PARTITION Nodes=$nodes Default=YES MaxTime=INFINITE State=UP" >> "$dir/slurm.conf"
}

start() {
  local dir count cpus
  dir=$(realpath "$1")
  count=$(node_count)
  if (( count < 1 )); then
    echo "slurm_two_nodes.sh: no nodes of prefix $NETNS_PREFIX: run scripts/netns_nodes.sh create 2 first" >&2
    exit 1
  fi
  cpus=${NODE_CPUS:-$(( $(nproc) / count > 0 ? $(nproc) / count : 1 ))}
  mkdir -p "$dir/state"
  chmod 700 "$dir"  # munged refuses a key in a directory others can write to
  for (( i = 0; i < count; i++ )); do mkdir -p "$dir/spool-node$i"; done
  head -c 128 /dev/urandom > "$dir/munge.key"
  chmod 600 "$dir/munge.key"
  write_conf "$dir" "$count" "$cpus"
  # `ip netns exec` mounts a /sys of its own, without /sys/fs/cgroup: name the plugin instead of autodetecting it
  # (autodetection fails there); proctrack/linuxproc and task/none use no cgroup.
  echo "CgroupPlugin=cgroup/v1" > "$dir/cgroup.conf"
  # Each daemon forks into the background inside its node and writes its pid file. --force: munged otherwise
  # refuses a socket in a directory not everyone can enter.
  "$NETNS" exec 0 munged --force --key-file="$dir/munge.key" --socket="$dir/munge.sock" \
    --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munged.seed"
  "$NETNS" exec 0 slurmctld -f "$dir/slurm.conf"
  for (( i = 0; i < count; i++ )); do
    "$NETNS" exec "$i" slurmd -f "$dir/slurm.conf" -N "node$i"
  done
}

stop() {
  local dir pidfile pid status=0
  dir=$(realpath "$1")
  for pidfile in "$dir"/slurmd-*.pid "$dir/slurmctld.pid" "$dir/munged.pid"; do
    [[ -f "$pidfile" ]] || continue
    pid=$(cat "$pidfile")
    if [[ -z "$pid" ]] || ! kill -TERM "$pid" 2>/dev/null; then
      continue  # not running
    fi
    for _ in $(seq 150); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      kill -KILL "$pid" 2>/dev/null || true
      echo "slurm_two_nodes.sh: $pidfile's process $pid did not end in 15 s: killed" >&2
      status=1
    fi
  done
  return "$status"
}

case "${1:-}" in
  start)
    (( $# == 2 )) || usage
    start "$2"
    ;;
  client)
    (( $# >= 2 )) || usage
    shift
    : "${SLURM_TWO_NODES_DIR:?set SLURM_TWO_NODES_DIR to the DIR given to start}"
    SLURM_CONF=$(realpath "$SLURM_TWO_NODES_DIR")/slurm.conf
    export SLURM_CONF
    exec "$NETNS" exec 0 "$@"
    ;;
  stop)
    (( $# == 2 )) || usage
    stop "$2"
    ;;
  *)
    usage
    ;;
esac
