#!/usr/bin/env bash
# The GPU check in one call: the CUDA tests and the GPU benchmark, results under $OUT.
#
#   1. Here, on a machine that reaches PyPI (once per checkout; the GPU machine reaches nothing):
#        bash scripts/gpu_check.sh --prepare
#      downloads pure-Python wheels (pytest and its deps, torchtune without deps) into .gpu-wheels/,
#      which .git/info/exclude ignores.
#   2. With the device tool, from the repository root:
#        run(command="bash scripts/gpu_check.sh", carry=[".gpu-wheels"], timeout_s=600)
#
# On the GPU machine it uses that machine's Python and torch as they are; what is missing (pytest,
# torchtune) is installed from .gpu-wheels/ into a private folder on PYTHONPATH, never over torch.
# Each step has its own time limit, so a slow step leaves time for the next:
#   env.txt      GPU, driver, Python, torch, triton, CUDA
#   pytest.log   pytest --device cuda tests/test_triton.py tests/test_cuda.py (GPU_CHECK_TEST_S, 330 s)
#   gpu.json, gpu.md, bench.log   python -m multihead.benchmarks.gpu (GPU_CHECK_BENCH_S, 220 s)
#   others.log   every scripts/gpu_check.d/*.sh (other issues' GPU parts), run with $OUT exported;
#                each should print its results (they land in others.log) and write no more than one
#                file of its own under $OUT (at most 8 files come back)
#   summary.txt  each step's exit status
# Anything beyond these steps: GPU_CHECK_PYTEST_ARGS (extra pytest arguments), GPU_CHECK_BENCH_ARGS
# (e.g. "--quick" for a smoke run). Works on a CPU machine too (tests skip, the benchmark says why).
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
WHEELS=$ROOT/.gpu-wheels

if [ "${1:-}" = "--prepare" ]; then
    python=${PYTHON:-python3}
    mkdir -p "$WHEELS"
    # pure-Python wheels only (any Python >= 3.10 on the GPU machine)
    "$python" -m pip download --no-deps --only-binary=:all: --implementation py --abi none --platform any \
        --python-version 3.10 -d "$WHEELS" pytest pluggy iniconfig packaging exceptiongroup tomli "torchtune==0.6.1" ||
        exit 1
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")"
    grep -qx '/.gpu-wheels/' "$exclude" 2>/dev/null || echo '/.gpu-wheels/' >>"$exclude"
    ls -l "$WHEELS"
    exit 0
fi

OUT=${OUT:-$ROOT/gpu-check-out}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
SITE=${TMPDIR:-/tmp}/multihead-gpu-site
export PYTHONPATH="$ROOT/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
summary=$OUT/summary.txt
: >"$summary"
step() {  # step NAME SECONDS LOG COMMAND...: run with a time limit, record the exit status
    local name=$1 limit=$2 log=$3
    shift 3
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
    local rc=$?
    echo "$name: exit $rc ($((SECONDS - t0)) s, limit $limit s)" | tee -a "$summary"
    return $rc
}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || echo "nvidia-smi: not found"
    "$PYTHON" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
try:
    import triton
    print("triton", triton.__version__)
except ImportError as err:
    print("triton: not importable:", err)
EOF
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# what the GPU machine's Python lacks, from the carried wheels, into a private folder
missing=()
"$PYTHON" -c "import pytest" 2>/dev/null || missing+=(pytest pluggy iniconfig packaging exceptiongroup tomli)
"$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torchtune') is None)" || missing+=(torchtune)
if [ ${#missing[@]} -gt 0 ]; then
    wheels=()
    for name in "${missing[@]}"; do
        for whl in "$WHEELS/$name"-*.whl; do [ -e "$whl" ] && wheels+=("$whl"); done
    done
    if [ ${#wheels[@]} -gt 0 ]; then
        step install 120 "$OUT/env.txt" "$PYTHON" -m pip install --no-deps --no-index --target "$SITE" "${wheels[@]}"
    fi
    echo "missing before install: ${missing[*]} (wheels found: ${#wheels[@]})" | tee -a "$summary"
fi

# shellcheck disable=SC2086
step tests "${GPU_CHECK_TEST_S:-330}" "$OUT/pytest.log" \
    "$PYTHON" -m pytest --device cuda -q -rs -p no:cacheprovider --durations=15 \
    tests/test_triton.py tests/test_cuda.py ${GPU_CHECK_PYTEST_ARGS:-}
tail -n 30 "$OUT/pytest.log"

# shellcheck disable=SC2086
step bench "${GPU_CHECK_BENCH_S:-220}" "$OUT/bench.log" \
    "$PYTHON" -m multihead.benchmarks.gpu --out "$OUT" ${GPU_CHECK_BENCH_ARGS:-}
tail -n 30 "$OUT/bench.log"

for hook in scripts/gpu_check.d/*.sh; do
    [ -e "$hook" ] || continue
    echo "== $hook" >>"$OUT/others.log"
    step "$hook" "${GPU_CHECK_HOOK_S:-120}" "$OUT/others.log" bash "$hook"
done

cat "$summary"
