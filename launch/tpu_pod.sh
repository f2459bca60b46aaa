#!/usr/bin/env bash
# Runs `python -m doge_jax.train` on every worker of a Cloud TPU VM pod slice (one process per host; JAX joins
# them through jax.distributed.initialize(), detected automatically on Cloud TPU).
#
#   launch/tpu_pod.sh --tpu my-v5e-32 --zone us-west4-a [--project P] [--setup] -- \
#       --config=configs/doge_60m.py --workdir=/mnt/shared/doge60m --config.model.dtype=bfloat16
#
#   --setup   first copy this checkout to ~/doge-jax on every worker and pip-install it with jax[tpu]
#             (rerun with --setup after changing the code; without it the copy already there is used).
#
# WORKDIR must be one directory every worker sees (a Filestore/NFS mount, or a bucket mounted with gcsfuse):
# checkpoints are written by all hosts together and read back on resume. Rerunning the same command resumes.
# Preemption / maintenance sends SIGTERM: the trainer saves a checkpoint and exits 143; rerun to continue.
set -euo pipefail

TPU="" ZONE="" PROJECT="" SETUP=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) TPU="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --setup) SETUP=1; shift ;;
    --) shift; break ;;
    *) echo "unknown option $1 (trainer flags go after --)" >&2; exit 2 ;;
  esac
done
[[ -n "$TPU" && -n "$ZONE" ]] || { echo "usage: $0 --tpu NAME --zone ZONE [--project P] [--setup] -- TRAIN_FLAGS" >&2; exit 2; }
[[ $# -gt 0 ]] || { echo "give the trainer flags after --, e.g. -- --config=configs/doge_60m.py --workdir=DIR" >&2; exit 2; }

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project "$PROJECT")
REPO="$(cd "$(dirname "$0")/.." && pwd)"

if [[ "$SETUP" == 1 ]]; then
  ARCHIVE="$(mktemp /tmp/doge-jax-XXXX.tgz)"
  tar -C "$REPO" --exclude=.git --exclude='*.pyc' --exclude=runs -czf "$ARCHIVE" .
  "${GCLOUD[@]}" scp "$ARCHIVE" "$TPU":/tmp/doge-jax.tgz --worker=all "${WHERE[@]}"
  "${GCLOUD[@]}" ssh "$TPU" --worker=all "${WHERE[@]}" --command "
    set -e
    rm -rf ~/doge-jax && mkdir -p ~/doge-jax && tar -C ~/doge-jax -xzf /tmp/doge-jax.tgz
    python3 -m pip install -q -U 'jax[tpu]' && python3 -m pip install -q -e ~/doge-jax"
  rm -f "$ARCHIVE"
fi

# Quote each trainer flag for the remote shell.
printf -v FLAGS ' %q' "$@"
"${GCLOUD[@]}" ssh "$TPU" --worker=all "${WHERE[@]}" --command "cd ~/doge-jax && python3 -m doge_jax.train$FLAGS"
