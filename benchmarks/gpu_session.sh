#!/usr/bin/env bash
# Measure the mhc-780m rows on a GPU machine in a few commands of at most ~10 minutes each (a bare
# machine: the packages it lacks come as wheels from `bash ../shared/tools/gpu-wheels.sh`, run
# beforehand on the machine with network, which fills ./.whl/ - an ignored folder: the device
# tool must be told to carry it, `carry: [".whl"]`).
#
#   bash benchmarks/gpu_session.sh check            # GPU correctness: compiled vs eager, hooks, bf16, tests
#   bash benchmarks/gpu_session.sh forward          # forward_overhead, bf16 weights (eager, compiled, caching, nnsight, n=1)
#   bash benchmarks/gpu_session.sh forward-autocast # the same with float32 weights under bf16 autocast (the anchors' setting)
#   bash benchmarks/gpu_session.sh sweeps-rescue    # causal_sweeps --only rescue: full rescue matrix on 64 x 1024 tokens
#   bash benchmarks/gpu_session.sh sweeps-patching  # causal_sweeps --only patching
#   bash benchmarks/gpu_session.sh probes           # probe_throughput + crosscoder_throughput
#
# Results (JSON + a log per stage, unbuffered so a run cut at the time limit keeps its log) go to
# $OUT (the device tool's folder) or benchmarks/results/.
# SHAPE / DEVICE / DTYPE override mhc-780m / cuda / bfloat16 (e.g. SHAPE=tiny DEVICE=cpu for a dry run).
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: gpu_session.sh check|forward|forward-autocast|sweeps-rescue|sweeps-patching|probes}
export PYTHONUNBUFFERED=1
shape=${SHAPE:-mhc-780m}
device=${DEVICE:-cuda}
dtype=${DTYPE:-bfloat16}
out=${OUT:-benchmarks/results}
mkdir -p "$out"

if ! python3 -c "import transformer_lens, nnsight" 2>/dev/null; then
    [ -d .whl ] || { echo "transformer-lens/nnsight missing and no .whl/: run bash ../shared/tools/gpu-wheels.sh first"; exit 1; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-}:$PWD
python3 -c "import torch; print('torch', torch.__version__, '| cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv 2>/dev/null || true

common=(--shape "$shape" --device "$device" --dtype "$dtype")
case "$stage" in
  check)
    # on the GPU machine these also run the GPU-only device_map test (skipped on CPU); go on if they fail
    python3 -m pytest -q tests/test_compiled.py tests/test_hooks.py tests/test_deepseek_v4.py 2>&1 | tail -5 \
        || echo "some tests failed (above)"
    python3 -m benchmarks.gpu_check "${common[@]}" 2>&1 | tee "$out/gpu_check-$shape.log"
    ;;
  forward)
    python3 -m benchmarks.forward_overhead "${common[@]}" --compile --repeats 5 \
        --out "$out/forward_overhead-$shape-$device.json" 2>&1 | tee "$out/forward_overhead-$shape.log"
    ;;
  forward-autocast)
    python3 -m benchmarks.forward_overhead --shape "$shape" --device "$device" --dtype float32 --autocast \
        --compile --repeats 5 --out "$out/forward_overhead-$shape-$device-autocast.json" 2>&1 \
        | tee "$out/forward_overhead-$shape-autocast.log"
    ;;
  sweeps-rescue|sweeps-patching)
    # the issue's setting: 64 prompts x 1024 tokens, in probe batches of 16 (their clean states at
    # every sublayer are cached: 72 x 16 x 1024 x 4 x 1280 bf16 = 12 GiB)
    kind=${stage#sweeps-}
    batch=${BATCH:-64}; pb=${PROMPT_BATCH:-16}
    [ "$shape" = mhc-780m ] || { batch=${BATCH:-4}; pb=${PROMPT_BATCH:-2}; }
    python3 -m benchmarks.causal_sweeps "${common[@]}" --compile --batch "$batch" --prompt-batch "$pb" \
        --only "$kind" --repeats 1 --warmup 0 --out "$out/causal_sweeps-$kind-$shape-$device.json" 2>&1 \
        | tee "$out/causal_sweeps-$kind-$shape.log"
    ;;
  probes)
    python3 -m benchmarks.probe_throughput "${common[@]}" --compile --repeats 2 \
        --out "$out/probe_throughput-$shape-$device.json" 2>&1 | tee "$out/probe_throughput-$shape.log"
    python3 -m benchmarks.crosscoder_throughput "${common[@]}" \
        --out "$out/crosscoder_throughput-$shape-$device.json" 2>&1 | tee "$out/crosscoder_throughput-$shape.log"
    ;;
  *) echo "unknown stage $stage: use check|forward|forward-autocast|sweeps-rescue|sweeps-patching|probes"; exit 2 ;;
esac
