#!/usr/bin/env bash
# numbabn on a real NVIDIA GPU, in one call of a lent machine :
# the CUDA tests with the simulator off, the GPU self-check and timing table, the bench table
# of the GPU backends, and the asv benchmarks' GPU grid points run without asv.  Each step
# is time-boxed so one hang cannot eat the lease; logs go to $OUT (or ./gpu-logs).
#
#   bash tools/gpu_check.sh                    # everything, about 6 minutes on an H100/H200
#   STEPS="check_cuda profile" bash tools/gpu_check.sh   # some of: test_cuda check_cuda
#                                                        # profile bench_gpu asv_gpu
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-logs}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NUMBA_ENABLE_CUDASIM=0
PY=${PY:-python3}
status=0
STEPS=${STEPS:-test_cuda check_cuda profile bench_gpu asv_gpu}
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  echo "== $name (limit ${limit} s)"
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n "${TAIL:-25}" "$OUT/$name.log"
  echo "== $name: rc $rc, $((SECONDS - start)) s"
  [ $rc -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
# Wheels carried in .whl/ (ignored by git) replace the machine's own: numbabn[cuda] caps NumPy
# below 2.5, which numba-cuda 0.30.4 cannot compile kernels with, and such a machine has no
# package index.  Fetch one here first, for the machine's Python (3.12 on the lent machines):
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
NUMBA_NUM_THREADS=2 step test_cuda 150 $PY -m pytest tests/test_cuda.py tests/test_bench.py -q -n 8 -p no:cacheprovider -rs
step check_cuda 90 $PY -m numbabn check --device cuda
step profile 60 $PY tools/gpu_profile.py calls kernels
step bench_gpu 100 $PY -c "
import numpy as np, json, sys
from numbabn.bench import report
r = report.run(report.SHAPES, budget=0.3, names=['numbabn-cuda', 'torch-cuda'])
json.dump(r, open('$OUT/bench_gpu.json', 'w'), default=float)
"
TAIL=12 step asv_gpu 80 bash -c "$PY tools/asv_grid.py --backend cuda torch-cuda --size small medium &&
  $PY tools/asv_grid.py --backend cuda torch-cuda --dtype float64"
exit $status
