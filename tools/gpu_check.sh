#!/usr/bin/env bash
# numbabn on a real NVIDIA GPU, in one call of a GPU machine :
# the CUDA tests with the simulator off (on numbabn's launch layer, the default), a check
# that the launch layer really launched, the GPU self-check and timing table, the profile
# (launch layer against numba's launches per call, first call of a fresh process with the
# kernel cache warm, each kernel alone), the bench table of the GPU backends, and the asv
# benchmarks' GPU grid points run without asv.  Each step is time-boxed so one hang cannot
# eat the lease, and a step that would start after DEADLINE seconds is skipped (and fails the
# run); logs go to $OUT (or ./gpu-logs), the profile's figures to $OUT/profile.json and a
# summary of every step to $OUT/summary.json.
#
#   bash tools/gpu_check.sh                    # everything, about 6-7 minutes on an H100/H200
#   STEPS="check_cuda profile" bash tools/gpu_check.sh   # some of: test_cuda fast_path
#                                      # check_cuda profile bench_gpu asv_gpu
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-logs}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# The launch layer is what runs by default; NUMBABN_CUDA_LAUNCH=numba here would test numba's
# launches instead, so it is set explicitly.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NUMBA_ENABLE_CUDASIM=0 NUMBABN_CUDA_LAUNCH=fast OUT
PY=${PY:-python3}
DEADLINE=${DEADLINE:-400}
status=0
STEPS=${STEPS:-test_cuda fast_path check_cuda profile bench_gpu asv_gpu}
: >"$OUT/steps.txt"
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  if [ $SECONDS -ge "$DEADLINE" ]; then
    echo "== $name: skipped, ${SECONDS} s past the ${DEADLINE} s deadline"
    echo "$name skipped 0" >>"$OUT/steps.txt"
    status=1
    return 0
  fi
  echo "== $name (limit ${limit} s)"
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n "${TAIL:-25}" "$OUT/$name.log"
  echo "== $name: rc $rc, $((SECONDS - start)) s"
  echo "$name $rc $((SECONDS - start))" >>"$OUT/steps.txt"
  [ $rc -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
# Wheels carried in .whl/ (ignored by git) replace the machine's own: numbabn[cuda] caps NumPy
# below 2.5, which numba-cuda 0.30.4 cannot compile kernels with, and such a machine has no
# package index.  Fetch one here first, for the machine's Python (3.12 on the GPU machines used so far):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl numpy==2.4.6
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
$PY -c "import numpy, numba, numba_cuda, torch; print('numpy', numpy.__version__); from numba import cuda; print('numba', numba.__version__, 'numba-cuda', numba_cuda.__version__, 'torch', torch.__version__, 'cudnn', torch.backends.cudnn.version()); cuda.detect()"

# Eight test processes, each with numba's default of one CPU thread per core for the CPU
# kernels the tests compare with, would run 128 threads on 16 cores.  On an H200 machine,
# that way 4 tests finished in 150 s; with 2 threads a process, 67 finished in 35 s (in a
# later run, where a third of them failed early, so the two runs are not a clean comparison).
# Each test worker compiles into a numba cache of its own (tests/conftest.py); the later
# steps compile into the default cache, shared from one step to the next.
NUMBA_NUM_THREADS=2 step test_cuda 150 $PY -m pytest tests/test_cuda.py tests/test_cuda_launch.py tests/test_cuda_hardware.py tests/test_sync_cuda.py tests/test_eval_backward.py tests/test_bench.py \
  -q -n 8 -p no:cacheprovider -rs
# The fast path must be the one that ran: a call that silently fell back to numba's launches
# would pass every test above.
step fast_path 60 $PY -c "
import numpy as np
from numba import cuda
import numbabn
from numbabn.cuda import _launch
assert _launch.FAST, 'the launch layer is off'
x = cuda.to_device(np.random.default_rng(0).standard_normal((64, 8, 40), dtype=np.float32))
y, m, s = numbabn.batch_norm_forward(x)
names = sorted({k[0].py_func.__name__ for k in _launch._KERNELS})
assert {'partials_strided', 'finish_channels', 'normalize_rows'} <= set(names), names
want = numbabn.batch_norm_forward(x.copy_to_host())[0]
assert np.allclose(y.copy_to_host(), want, rtol=1e-6, atol=1e-6)
print('launched through the layer:', names)
"
step check_cuda 90 $PY -m numbabn check --device cuda
step profile 120 $PY tools/gpu_profile.py launch cold calls kernels
step bench_gpu 100 $PY -c "
import numpy as np, json, sys
from numbabn.bench import report
r = report.run(report.SHAPES, budget=0.3, names=['numbabn-cuda', 'torch-cuda'])
json.dump(r, open('$OUT/bench_gpu.json', 'w'), default=float)
"
TAIL=12 step asv_gpu 70 bash -c "$PY tools/asv_grid.py --backend cuda torch-cuda --size small medium &&
  $PY tools/asv_grid.py --backend cuda torch-cuda --dtype float64"
$PY - "$OUT" <<'PYEOF'
import json, os, sys
out = sys.argv[1]
steps = {}
for line in open(os.path.join(out, "steps.txt")):
    name, rc, seconds = line.split()
    steps[name] = {"rc": int(rc), "seconds": int(seconds)} if rc != "skipped" else {"rc": None, "skipped": True}
summary = {"steps": steps}
path = os.path.join(out, "profile.json")
if os.path.exists(path):
    summary["profile"] = json.load(open(path))
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
prof = summary.get("profile", {})
if "launch_us" in prof:
    fast, t = prof["launch_us"]["fast"], prof["launch_us"]["targets"]
    print("host us per call, (32, 64):", ", ".join(f"{k} {fast[k]:.1f} (target <= {t[k]:.0f})" for k in t))
if "cold_start_s" in prof:
    c = prof["cold_start_s"]
    print(f"first calls, fresh process, cache warm: {c['warm_cache']['first_calls_s']:.2f} s (target <= {c['target']:.0f} s)")
print("steps:", ", ".join(f"{k} {v.get('rc')}" for k, v in steps.items()))
PYEOF
echo "== total $SECONDS s"
exit $status
