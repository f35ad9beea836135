#!/usr/bin/env bash
# Install Debian/Ubuntu packages quietly, as root or through sudo: what the CI set-up scripts share
# (scripts/ci_slurm.sh, scripts/ci_netns.sh). Installs only what it is given; checking first is the caller's job.
#
# Example:
#   scripts/apt_install.sh slurm-wlm munge
set -euo pipefail

sudo=()
if (( EUID != 0 )); then
  sudo=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "$@" >/dev/null
