#!/usr/bin/env bash
# Install what the two-node launch tests (tests/launch/test_two_nodes.py) need, which otherwise skip: iproute2
# (`ip netns`) and util-linux (`unshare`) for scripts/netns_nodes.sh, and openssh-server, openssh-client and pdsh
# for the DeepSpeed launcher's ssh start of every node. Idempotent: returns at once when the binaries are there.
# Needs root (or sudo) and apt (Debian/Ubuntu). Installs only: the tests make their nodes, keys and sshd
# configuration under /etc/netns/<their node>/ and a temp dir, start what they need in the nodes, and remove it all.
#
# Example (CI, before `make test`):
#   scripts/ci_netns.sh
set -euo pipefail

if command -v ip >/dev/null && command -v unshare >/dev/null && command -v ssh >/dev/null \
  && command -v ssh-keygen >/dev/null && command -v pdsh >/dev/null && [[ -x /usr/sbin/sshd ]]; then
  exit 0
fi
"$(dirname "$0")/apt_install.sh" iproute2 util-linux openssh-server openssh-client pdsh
