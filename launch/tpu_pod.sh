#!/usr/bin/env bash
# Runs `python -m doge_jax.train` (or another module) on every worker of a Cloud TPU VM pod slice: one process
# per host, joined by jax.distributed.initialize() (detected automatically on Cloud TPU).
#
#   launch/tpu_pod.sh --tpu doge-v4-32 --zone us-central2-b [--project P] [--setup] -- \
#       --config=configs/doge_60m.py --data=configs/data/smollm_corpus.py --workdir=gs://BUCKET/doge60m \
#       --config.model.dtype=bfloat16 --config.mesh.fsdp=4
#   launch/tpu_pod.sh --tpu doge-v4-32 --zone us-central2-b --module doge_jax.data.pretokenize -- \
#       --data=configs/data/smollm_corpus.py --out gs://BUCKET/smollm --num-shards 4 --shard-index {worker}
#
#   --setup   first copy this checkout to ~/doge-jax on every worker and `pip install -e ~/doge-jax[tpu]` (a jax
#             already installed in range is kept; rerun with --setup after changing the code).
#   --module  the python module to run instead of doge_jax.train; a flag `{worker}` becomes the worker's number
#             (0..hosts-1, from the TPU VM metadata), e.g. for one pretokenize shard per worker.
#
# WORKDIR must be one location every worker sees: a gs:// bucket (the TPU VM's service account needs read and
# write on it), or an NFS / Filestore mount. Rerunning the same command resumes. Preemption / maintenance sends
# SIGTERM: the trainer saves a checkpoint and exits 143; rerun to continue.
set -euo pipefail

TPU="" ZONE="" PROJECT="" SETUP=0 MODULE="doge_jax.train"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) TPU="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --module) MODULE="$2"; shift 2 ;;
    --setup) SETUP=1; shift ;;
    --) shift; break ;;
    *) echo "unknown option $1 (the module's flags go after --)" >&2; exit 2 ;;
  esac
done
[[ -n "$TPU" && -n "$ZONE" ]] || { echo "usage: $0 --tpu NAME --zone ZONE [--project P] [--setup] [--module M] -- FLAGS" >&2; exit 2; }
[[ $# -gt 0 ]] || { echo "give the flags after --, e.g. -- --config=configs/doge_60m.py --workdir=gs://BUCKET/run" >&2; exit 2; }
[[ "$MODULE" =~ ^[A-Za-z_][A-Za-z0-9_.]*$ ]] || { echo "--module=$MODULE is not a python module name" >&2; exit 2; }

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
    python3 -m pip install -q -e ~/doge-jax[tpu]"
  rm -f "$ARCHIVE"
fi

# Quote each flag for the remote shell; {worker} becomes the remote $WORKER.
FLAGS=""
for arg in "$@"; do
  if [[ "$arg" == "{worker}" ]]; then FLAGS+=' "$WORKER"'; else FLAGS+=" $(printf '%q' "$arg")"; fi
done
METADATA=http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number
"${GCLOUD[@]}" ssh "$TPU" --worker=all "${WHERE[@]}" --command \
  "cd ~/doge-jax && WORKER=\$(curl -s -H Metadata-Flavor:Google $METADATA) && python3 -m $MODULE$FLAGS"
