#!/usr/bin/env bash
# Install Slurm and munge for the Slurm launch test (tests/launch/test_slurm.py), which otherwise skips.
# Idempotent: returns at once when the binaries are there. Needs root (or sudo) and apt (Debian/Ubuntu).
# Installs only: the test starts its own munged and one-node cluster in a temp dir, and stops them.
#
# Example (CI, before `make test`):
#   scripts/ci_slurm.sh
set -euo pipefail

if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
  && command -v sbatch >/dev/null; then
  exit 0
fi
"$(dirname "$0")/apt_install.sh" slurm-wlm munge
