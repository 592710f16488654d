#!/usr/bin/env bash
# Runs N CPU processes of mocov2_jax.main on this machine, joined by jax.distributed.
# Usage: launch/local_processes.sh N [main flags...]
set -euo pipefail
n=$1; shift
port=$((20000 + RANDOM % 10000))
pids=()
for ((i = 0; i < n; i++)); do
  JAX_PLATFORMS=cpu python -m mocov2_jax.main --coordinator=localhost:$port --num_processes=$n \
    --process_id=$i "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
