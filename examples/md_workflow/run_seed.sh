#!/usr/bin/env bash
# The seed workflow on one machine, both scenarios: node-local storage (UCX pulls between two
# mounts), then shared storage (wait only, no copy).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bash "$here/run_local.sh"
echo
bash "$here/run_shared.sh"
