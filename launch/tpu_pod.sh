#!/usr/bin/env bash
# MoCo v2 pre-training on a TPU VM pod slice: the same command on every worker, joined by
# jax.distributed (it finds the other hosts by itself). On preemption (SIGTERM) every host saves
# the same step and exits 75; this script then waits for the TPU to be READY again and runs the
# same command, which resumes from the workdir (use gs:// so every host sees it).
#
#   launch/tpu_pod.sh TPU_NAME ZONE --config=configs/mocov2.py --workdir=gs://BUCKET/mocov2 \
#       --config.data.data_dir=gs://BUCKET/tfds
set -uo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 TPU_NAME ZONE main-flags..." >&2
  exit 2
fi
tpu=$1 zone=$2
shift 2
flags=$(printf ' %q' "$@")
stopping=0
forward() {   # SIGTERM / SIGINT here: every worker saves and exits (75 / 130); no restart
  stopping=1
  gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command \
    "pkill -$1 -f 'python -m mocov2_jax.main'"
}
trap 'forward TERM' TERM
trap 'forward INT' INT
while true; do
  gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command \
    "cd mocov2_jax && MOCO_DISTRIBUTED=1 python -m mocov2_jax.main$flags" &
  ssh_pid=$!
  wait $ssh_pid   # a trapped signal interrupts it: wait again until the workers have ended
  while kill -0 $ssh_pid 2>/dev/null; do wait $ssh_pid; done
  wait $ssh_pid
  status=$?
  [[ $stopping -eq 0 ]] || exit $status
  [[ $status -eq 75 || $status -eq 255 ]] || exit $status   # 255: ssh lost (a preempted host)
  until [[ $(gcloud compute tpus tpu-vm describe "$tpu" --zone="$zone" \
      --format='value(state)') == READY ]]; do
    sleep 60
  done
done
