#!/usr/bin/env bash
# Every GPU figure of the product in one run (< 8 minutes on one H100/H200), for a GPU lent for minutes at a time:
# the CUDA tests, `s2t bench model` (decoder step vs its floor, generation with and without CUDA graphs, fp16 and
# fp32, features included, against transformers), the whole job against the model alone (`s2t bench pipeline`) and
# Serve batched against unbatched at concurrency 64 (`s2t bench serve`). Each part has its own time limit, so one
# that hangs or fails costs only itself. Output: stdout, and $OUT/gpu.log when OUT is set.
#
#   bash bench/gpu.sh                    # on a machine with the project installed (make install, CUDA torch)
#   SITE=".gpu/site.tar.xz .gpu/site2.tar.xz" bash bench/gpu.sh   # a bare machine with torch: Ray & co. from
#                                        # tarballs of unpacked wheels (later ones override earlier ones)
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
PARTS=${PARTS:-"tests model pipeline serve"}
wants() { [[ " $PARTS " == *" $1 "* ]]; }
# The job and Serve are timed on s2t-small dimensions (random weights, the demo model's tokenizer): the bundled demo
# model is too small to keep a GPU busy, and its figures would time the CPU side alone.
SMALL=/tmp/s2t-small-random
$PY -c "from bench.model import random_checkpoint as r; from s2t_model import DEMO_MODEL; r('$SMALL', DEMO_MODEL)"
if wants tests; then
  part 90 "CUDA tests" $PY -m pytest -q -p no:cacheprovider tests/test_model.py -k "cuda or capacity or graph"
fi
if wants model; then
  part 75 "bench model, float16" $S2T bench model --device cuda --dtype float16 --utterances 64 --seconds 10 --step-batch 64
  part 60 "bench model, float16, 256 utterances" $S2T bench model --device cuda --dtype float16 --utterances 256 --seconds 10 --step-batch 8 --skip-features
  part 60 "bench model, float32" $S2T bench model --device cuda --dtype float32 --utterances 64 --seconds 10 --step-batch 8 --skip-features
fi
if wants pipeline; then
  # Features on CPU actors (what `auto` picks with GPUs) over 10 h; computed in the GPU actor (fused) over 1 h: on the
  # H200 fused ran at a quarter of model-only and 10 h did not end within 120 s (its one CPU decodes all the audio).
  for stage_hours in "separate 10" "fused 1"; do
    set -- $stage_hours
    part 110 "bench pipeline: the job on one GPU vs the model alone, features $1, $2 h" \
      $S2T bench pipeline --model $SMALL --device cuda --num-gpus 1 --dtype float16 --hours $2 --max-new-tokens 60 \
        --feature-stage $1 --feature-actors 12 --max-frames 192000 --batch-size 256 --quiet-wait 0
  done
fi
if wants serve; then
  part 200 "bench serve, concurrency 64" $S2T bench serve --model $SMALL --device cuda --dtype float16 \
    --concurrency 1,64 --requests 256 --max-batch-size 64 --max-frames 192000 --cpus-per-replica 8
fi
echo "done $(date -u +%T)"
