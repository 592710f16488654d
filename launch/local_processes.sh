#!/usr/bin/env bash
# Runs N CPU processes of mocov2_jax.main on this machine, joined by jax.distributed.
# Usage: launch/local_processes.sh N [main flags...]
# SIGTERM / SIGINT to this script go to every worker; it waits for their saves and exits with
# the first worker's non-zero code (75 preempted, 130 interrupted), so no worker is orphaned.
set -uo pipefail
n=$1; shift
port=$((20000 + RANDOM % 10000))
pids=()
forward() { kill -s "$1" "${pids[@]}" 2>/dev/null; }
trap 'forward TERM' TERM
trap 'forward INT' INT
for ((i = 0; i < n; i++)); do
  JAX_PLATFORMS=cpu python -m mocov2_jax.main --coordinator=localhost:$port --num_processes=$n \
    --process_id=$i "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid"   # a trapped signal interrupts it: wait again until the worker has ended
  while kill -0 "$pid" 2>/dev/null; do wait "$pid"; done
  wait "$pid"   # bash keeps an ended worker's code: this reads it, not an interrupted wait's
  code=$?
  [[ $status -ne 0 ]] || status=$code
done
exit $status
