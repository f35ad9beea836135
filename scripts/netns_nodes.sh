#!/usr/bin/env bash
# Cluster nodes on one machine: each node is a network namespace with its own interface, address, hostname and
# /etc/hosts, so a multi-node launch (torchrun, the DeepSpeed launcher, ssh, Slurm) crosses a real network stack
# instead of 127.0.0.1. The nodes share the disk, as nodes share a cluster filesystem. Needs root, iproute2 (`ip`)
# and util-linux (`unshare`), and for `sshd` openssh-server and openssh-client: scripts/ci_netns.sh installs them.
#
# A hub namespace holds a bridge; node i's namespace holds eth0 (a veth to the bridge) with NETNS_SUBNET.<i+1>/24,
# and an /etc/hosts (bound by `ip netns exec`) naming every node: node0, node1, ... Nothing is added to the
# machine's own network namespace, so the subnet only has to be free inside these namespaces.
#
# Commands:
#   create N           make nodes 0..N-1 (and the hub); fails if any of them exists
#   exec I CMD ARG...  run CMD on node I: in its namespace, with hostname nodeI (a UTS namespace of its own)
#   sshd               start an sshd on every node: root on any node logs in to any other (`ssh node1`) with a key
#                      made for these nodes, and ssh passes OMP_NUM_THREADS on (as Debian's default passes LANG).
#                      Each node's /etc/ssh is its own (/etc/netns/<ns>/ssh) and its sshd a /run of its own.
#   destroy            kill every process left in the nodes, delete them and their /etc/netns files (idempotent)
#
# Variables:
#   NETNS_PREFIX  names the namespaces <prefix>-hub and <prefix>-node<i> (default dftnet); one per set of nodes
#   NETNS_SUBNET  the nodes' /24, its first three octets (default 10.231.0)
#
# Example (2 nodes, torchrun across them):
#   scripts/netns_nodes.sh create 2
#   scripts/netns_nodes.sh exec 0 env NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/multi_node.sh debug=quick &
#   scripts/netns_nodes.sh exec 1 env NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/multi_node.sh debug=quick
#   scripts/netns_nodes.sh destroy
# With ssh, the DeepSpeed launcher on node 0 starts both nodes (pdsh): after create, `scripts/netns_nodes.sh sshd`,
#   then a hostfile of "node0 slots=1" and "node1 slots=1" lines, and
#   scripts/netns_nodes.sh exec 0 env HOSTFILE=hostfile MASTER_ADDR=node0 launch/multi_node.sh debug=quick
set -euo pipefail

NETNS_PREFIX=${NETNS_PREFIX:-dftnet}
NETNS_SUBNET=${NETNS_SUBNET:-10.231.0}
HUB="$NETNS_PREFIX-hub"

usage() {
  echo "usage: scripts/netns_nodes.sh create N | exec I CMD [ARG...] | sshd | destroy" >&2
  exit 2
}

# The namespaces of this prefix that exist now, the hub included.
our_namespaces() {
  ip netns list | awk '{print $1}' | grep -E "^${NETNS_PREFIX}-(hub|node[0-9]+)$" || true
}

create() {
  local count=$1
  if ! [[ "$count" =~ ^[1-9][0-9]*$ ]] || (( count > 253 )); then
    usage
  fi
  ip netns add "$HUB"
  ip -n "$HUB" link add br0 type bridge
  ip -n "$HUB" link set br0 up
  local hosts="127.0.0.1 localhost"$'\n'
  for (( i = 0; i < count; i++ )); do
    hosts+="$NETNS_SUBNET.$(( i + 1 )) node$i"$'\n'
  done
  for (( i = 0; i < count; i++ )); do
    local ns="$NETNS_PREFIX-node$i"
    ip netns add "$ns"
    ip -n "$HUB" link add "veth$i" type veth peer name eth0 netns "$ns"
    ip -n "$HUB" link set "veth$i" master br0 up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "$NETNS_SUBNET.$(( i + 1 ))/24" dev eth0
    ip -n "$ns" link set eth0 up
    mkdir -p "/etc/netns/$ns"
    printf '%s' "$hosts" > "/etc/netns/$ns/hosts"
  done
}

destroy() {
  local ns pids status=0
  for ns in $(our_namespaces); do
    # A namespace outlives `ip netns del` while a process is in it: kill them first, and keep it if one survives.
    for _ in $(seq 50); do
      pids=$(ip netns pids "$ns")
      [[ -z "$pids" ]] && break
      # shellcheck disable=SC2086
      kill -KILL $pids 2>/dev/null || true
      sleep 0.1
    done
    pids=$(ip netns pids "$ns")
    if [[ -n "$pids" ]]; then
      echo "netns_nodes.sh: processes $pids outlived SIGKILL in $ns: left it" >&2
      status=1
      continue
    fi
    ip netns del "$ns"
    rm -rf "/etc/netns/${ns:?}"
  done
  rmdir /etc/netns 2>/dev/null || true  # made by `create` when missing; kept if anything else is in it
  return "$status"
}

# The node namespaces of this prefix, without the hub.
our_nodes() {
  our_namespaces | grep -E -- '-node[0-9]+$' || true
}

start_sshd() {
  local client ns dir
  client=$(mktemp -d)
  ssh-keygen -q -t ed25519 -N '' -C "netns_nodes $NETNS_PREFIX" -f "$client/id_ed25519"
  for ns in $(our_nodes); do
    dir="/etc/netns/$ns/ssh"
    mkdir -p "$dir"
    cp "$client/id_ed25519" "$client/id_ed25519.pub" "$dir/"
    cp "$client/id_ed25519.pub" "$dir/authorized_keys"
    ssh-keygen -q -t ed25519 -N '' -C "$ns" -f "$dir/ssh_host_ed25519_key"
    cat > "$dir/sshd_config" <<'CONF'
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile /etc/ssh/authorized_keys
UsePAM no
AcceptEnv OMP_NUM_THREADS
PidFile none
CONF
    cat > "$dir/ssh_config" <<'CONF'
Host *
  IdentityFile /etc/ssh/id_ed25519
  IdentitiesOnly yes
  BatchMode yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  GlobalKnownHostsFile /dev/null
  LogLevel ERROR
  SendEnv OMP_NUM_THREADS
CONF
  done
  rm -rf "$client"
  for ns in $(our_nodes); do
    # The privilege separation directory lives in /run: a tmpfs of this sshd's own (`ip netns exec` gives it a
    # mount namespace), so nothing is made in the machine's /run. sshd then forks into the background.
    # shellcheck disable=SC2016
    "$0" exec "${ns##*-node}" sh -c 'mount -t tmpfs -o mode=0755 tmpfs /run && mkdir /run/sshd && exec "$@"' sh \
      /usr/sbin/sshd
  done
}

case "${1:-}" in
  create)
    (( $# == 2 )) || usage
    create "$2"
    ;;
  exec)
    (( $# >= 3 )) || usage
    node=$2
    shift 2
    # `ip netns exec` binds /etc/netns/<ns>/hosts over /etc/hosts; unshare gives the node its own hostname.
    # shellcheck disable=SC2016  # $0 and $@ are the inner shell's: the hostname and the command
    exec ip netns exec "$NETNS_PREFIX-node$node" unshare --uts sh -c 'hostname "$0" && exec "$@"' "node$node" "$@"
    ;;
  sshd)
    (( $# == 1 )) || usage
    start_sshd
    ;;
  destroy)
    (( $# == 1 )) || usage
    destroy
    ;;
  *)
    usage
    ;;
esac
