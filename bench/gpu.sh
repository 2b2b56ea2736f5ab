#!/usr/bin/env bash
# Every GPU figure of the product in one run (< 8 minutes on one H100/H200), for a GPU lent for minutes at a time:
# the CUDA tests, `s2t bench feed` on this node's CPUs, `s2t bench model` (generation with and without CUDA graphs,
# greedy and beam 5, fp16, against transformers), the whole job against the model alone (`s2t bench pipeline`) with
# both feature paths (device: CPU actors decode, the GPU actor detects speech and computes features; separate: CPU
# feature actors), greedy and beam 5, and Serve batched against unbatched at concurrency 64 (`s2t bench serve`).
# Real token rates: s2t-small dimensions with random weights on 10 s utterances, at most 35 new tokens (3.5 tokens
# per audio-second, a trained model's rate; the random model's own end of sentence comes at 20-60 tokens). Each part
# has its own time limit, so one that hangs or fails costs only itself. Output: stdout, and $OUT/gpu.log when OUT is
# set.
#
#   bash bench/gpu.sh                    # on a machine with the project installed (make install, CUDA torch)
#   SITE=".gpu/site.tar.xz .gpu/site2.tar.xz" bash bench/gpu.sh   # a bare machine with torch: Ray & co. from
#                                        # tarballs of unpacked wheels (later ones override earlier ones)
#   PARTS="pipeline" HOURS=60 DECODERS=24 bash bench/gpu.sh      # one part, a longer corpus, more decode actors
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${OUT:-/tmp}/gpu.log
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${SITE:-}" ]; then
  mkdir -p /tmp/site && for tarball in $SITE; do tar xJf "$tarball" -C /tmp/site; done
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
PY=${PYTHON:-python3}
S2T="$PY -m jobs.cli"
part() {  # part SECONDS TITLE COMMAND...
  local limit=$1 title=$2; shift 2
  echo; echo "=== $title ($(date -u +%T), limit ${limit}s)"
  local start=$SECONDS
  timeout -k 10 "$limit" "$@"; local rc=$?
  echo "=== $title: exit $rc in $((SECONDS - start)) s"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
# PARTS: which parts to run (default: all), e.g. PARTS="pipeline serve".
PARTS=${PARTS:-"tests feed model pipeline serve"}
wants() { [[ " $PARTS " == *" $1 "* ]]; }
# HOURS of 10 s utterances per job (the job's time includes its actors' start-up, ~15 s); DECODERS: CPU actors that
# decode (device path) or compute features (separate), default all but 4 of the node's cores.
HOURS=${HOURS:-30}
CORES=$(nproc)
DECODERS=${DECODERS:-$(( CORES > 6 ? CORES - 4 : 2 ))}
TOKENS=35  # most new tokens for a 10 s utterance: 3.5 per audio-second
echo "cores $CORES, decode/feature actors $DECODERS, $HOURS h a job"
# The job and Serve are timed on s2t-small dimensions (random weights, the demo model's tokenizer): the bundled demo
# model is too small to keep a GPU busy, and its figures would time the CPU side alone.
SMALL=/tmp/s2t-small-random
$PY -c "from bench.model import random_checkpoint as r; from s2t_model import DEMO_MODEL; r('$SMALL', DEMO_MODEL)"
if wants tests; then
  part 60 "CUDA tests" $PY -m pytest -q -p no:cacheprovider tests/test_model.py tests/test_gpu_stage.py \
    -k "cuda or capacity or graph"
fi
if wants feed; then
  part 40 "bench feed: this node's CPUs per stage, cores per GPU" $S2T bench feed --ray --rtfx 20000
fi
if wants model; then
  part 70 "bench model, float16, 256 x 10 s, greedy and beam 5, real token rate" $S2T bench model --device cuda \
    --dtype float16 --utterances 256 --seconds 10 --max-new-tokens $TOKENS --step-batch 8 --skip-features
fi
if wants pipeline; then
  # Model-only: features on the GPU, each distinct file decoded once; the job: everything, start-up included.
  for beams in 1 5; do
    for stage in device separate; do
      part 75 "bench pipeline: the job on one GPU vs the model alone, features $stage, beams $beams, $HOURS h" \
        $S2T bench pipeline --model $SMALL --device cuda --num-gpus 1 --dtype float16 --seconds 10 --hours $HOURS \
          --num-beams $beams --max-new-tokens $TOKENS --max-frames 192000 --feature-stage $stage \
          --feature-actors $DECODERS \
          --quiet-wait 0
    done
  done
fi
if wants serve; then
  part 150 "bench serve, concurrency 64" $S2T bench serve --model $SMALL --device cuda --dtype float16 \
    --concurrency 64 --requests 256 --max-batch-size 64 --max-frames 192000 --cpus-per-replica 8
fi
echo "done $(date -u +%T)"
