#!/usr/bin/env bash
# Every GPU check of unicom in one run: the CUDA tests, then each GPU benchmark, side by side
# on one GPU, in under 10 minutes on one H100/H200 (the stages' time limits add up to 590 s).
# Results go to benchmarks/results/*_cuda.txt, each benchmark's file rewritten as its parts
# finish, so a stage stopped by its time limit keeps what it measured:
#
#   gpu_tests_cuda.txt        the CUDA-only tests (sync-free step, nvJPEG path, torch k-means, ...)
#   partial_fc_step_cuda.txt  PartialFC + SparseAdamW step at K = 1M and 100k, eager and as one CUDA graph
#                             (targets: 1M <= 4 ms, 100k <= 0.5x the full softmax)
#   kmeans_cuda.txt           torch k-means assignment as a share of the float32 matrix rate (target >= 50%)
#   embed_pipeline_cuda.txt   unicom embed, decode=gpu and decode=cpu, against the bare forward (target >= 0.7x)
#   train_step_cuda.txt       ViT-B/16 224 px bf16 + PartialFC 1M at r1 = 0.1: MFU eager and compiled (target >= 40%);
#                             SDPA backends side by side, and the compiled step with one > 5% faster than PyTorch's choice
#
# Usage:
#   benchmarks/gpu_suite.sh                      # on a GPU machine
#   benchmarks/gpu_suite.sh --device cpu --smoke # the same steps at toy sizes on the CPU (checks the script;
#                                                # writes *_smoke_cpu.txt under $RESULTS, default /tmp/unicom-gpu-smoke)
#   benchmarks/gpu_suite.sh --only tests,partial_fc,kmeans   # some stages (two device commands of ~4 minutes
#   benchmarks/gpu_suite.sh --only embed,train_step          # each, or one stage again after a fix)
#
# What it needs beyond torch, torchvision, timm, pillow, pyarrow, numpy, scipy and scikit-learn:
# faiss-cpu, open_clip_torch (+ ftfy, wcwidth), pytorch-metric-learning, braceexpand, universal_pathlib
# (+ pathlib-abc). Missing ones are installed from $WHEELS (default .wheels/ when it exists: a folder
# of wheels, for machines without a network) or else from the package index. scripts/gpu-wheels.sh
# fills .wheels/ for a Python 3.12 x86-64 machine; then, on a machine lent without a network:
#   scripts/gpu-wheels.sh                                   # here, once
#   benchmarks/gpu_suite.sh                                 # there, with .wheels/ carried beside the tree
#
# Compiled graphs are kept in $TORCHINDUCTOR_CACHE_DIR (default .cache/inductor in the repository):
# keep that folder between runs and the second run skips most of the compilation.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
DEVICE=cuda
SMOKE=0
ONLY=tests,partial_fc,kmeans,embed,train_step
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --smoke) SMOKE=1; shift ;;
    --only) ONLY=$2; shift 2 ;;
    *) echo "unknown argument $1 (use --device cuda|cpu, --smoke, --only STAGE,...)" >&2; exit 2 ;;
  esac
done
for name in ${ONLY//,/ }; do
  case "$name" in
    tests|partial_fc|kmeans|embed|train_step) ;;
    *) echo "--only: unknown stage $name (stages: tests, partial_fc, kmeans, embed, train_step)" >&2; exit 2 ;;
  esac
done
if [ "$DEVICE" = cpu ]; then SMOKE=1; fi
RESULTS=${RESULTS:-$( [ "$SMOKE" = 1 ] && echo /tmp/unicom-gpu-smoke || echo "$ROOT/benchmarks/results" )}
mkdir -p "$RESULTS"
SUFFIX=$( [ "$SMOKE" = 1 ] && echo "smoke_$DEVICE" || echo cuda )
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export UNICOM_PROGRESS=0 PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$ROOT/.cache/inductor}
START=$(date +%s)
FAILED=()

selected() {  # selected NAME: whether --only keeps stage NAME
  case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac
}

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, keep going on failure
  local name=$1 limit=$2
  shift 2
  selected "$name" || return 0
  echo "== $name (limit ${limit}s, at $(( $(date +%s) - START ))s)"
  if ! timeout --kill-after=10 "$limit" "$@"; then
    echo "!! $name failed or ran past ${limit}s" >&2
    FAILED+=("$name")
  fi
}

# -- 1. what is missing ---------------------------------------------------------------------
missing=$("$PY" - <<'EOF'
import importlib.util
need = {"faiss": "faiss-cpu", "open_clip": "open_clip_torch", "ftfy": "ftfy", "wcwidth": "wcwidth",
        "pytorch_metric_learning": "pytorch-metric-learning", "braceexpand": "braceexpand",
        "upath": "universal_pathlib", "pathlib_abc": "pathlib-abc"}
print(" ".join(pip for module, pip in need.items() if importlib.util.find_spec(module) is None))
EOF
)
if [ -z "${WHEELS:-}" ] && [ -d "$ROOT/.wheels" ]; then WHEELS=$ROOT/.wheels; fi
if [ -n "$missing" ]; then
  echo "== installing: $missing"
  SITE=${SITE:-/tmp/unicom-site}
  if [ -n "${WHEELS:-}" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl || exit 1
  else
    "$PY" -m pip install -q --target "$SITE" $missing || exit 1
  fi
  export PYTHONPATH="$PYTHONPATH:$SITE"
fi
base=$("$PY" - <<'EOF'
import importlib.util
base = {"torch": "torch", "torchvision": "torchvision", "timm": "timm", "PIL": "pillow", "pyarrow": "pyarrow",
        "numpy": "numpy", "scipy": "scipy", "sklearn": "scikit-learn"}
print(" ".join(pip for module, pip in base.items() if importlib.util.find_spec(module) is None))
EOF
)
if [ -n "$base" ]; then  # not installed by this script: the machine's own (or a virtual environment's)
  echo "$PY lacks these packages: $base; install them, or give a Python that has them (PYTHON=.venv/bin/python $0 ...)" >&2
  exit 1
fi
"$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
if [ "$DEVICE" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "no CUDA device here: run with --device cpu --smoke to check the script" >&2
  exit 1
fi

# -- 2. the CUDA tests (on the CPU: every test of these files, the CUDA ones skipped) ---------
TESTS=(tests/test_sync_free_step.py tests/test_captured_step.py tests/test_gpu_decode.py tests/test_host_copies.py tests/test_kmeans_backends.py tests/test_sparse_adamw.py
       tests/test_partial_fc.py tests/test_fused_softmax.py tests/test_metrics.py tests/test_attention_backend.py
       tests/test_dedup.py tests/test_evaluate_report.py)
if [ "$SMOKE" = 1 ]; then SELECT=(-k "recorder or cuda"); else SELECT=(-k "cuda or on_the_gpu"); fi
if selected tests; then  # the output file only when the stage runs: --only without tests keeps the last one
  stage tests 110 "$PY" -m pytest -q -p no:cacheprovider -rs "${TESTS[@]}" "${SELECT[@]}" \
    > >(tee "$RESULTS/gpu_tests_$SUFFIX.txt") 2>&1
fi

# -- 3. the benchmarks, cheapest first ------------------------------------------------------
if [ "$SMOKE" = 1 ]; then
  stage partial_fc 300 "$PY" benchmarks/partial_fc_step.py --device "$DEVICE" --classes 20000 --steps 2 \
    --profile --out "$RESULTS/partial_fc_step_$SUFFIX.txt"
  stage kmeans 300 "$PY" benchmarks/kmeans_cuda.py --device "$DEVICE" --smoke --out "$RESULTS/kmeans_$SUFFIX.txt"
  stage embed 600 "$PY" benchmarks/embed_pipeline.py --device "$DEVICE" --images 64 --shards 2 --batch-size 16 \
    --device-decode
  stage train_step 900 "$PY" benchmarks/train_step.py --device "$DEVICE" --smoke --batches 8 --compile \
    --out "$RESULTS/train_step_$SUFFIX.txt"
else
  # K = 1M: the step time target (a); K = 100k: a against the full softmax (c)
  stage partial_fc 120 "$PY" benchmarks/partial_fc_step.py --device cuda --classes 1000000 100000 --steps 21 \
    --variants ae ace --profile
  stage kmeans 60 "$PY" benchmarks/kmeans_cuda.py --device cuda
  stage embed 100 "$PY" benchmarks/embed_pipeline.py --device cuda --images 8000 --shards 8 --batch-size 256 --write
  stage train_step 200 "$PY" benchmarks/train_step.py --device cuda --compile --batches 1024
fi

echo "== done in $(( $(date +%s) - START ))s; results in $RESULTS:"
ls -l "$RESULTS"/*"$SUFFIX"*.txt 2>/dev/null
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "failed: ${FAILED[*]}" >&2
  exit 1
fi
