#!/usr/bin/env bash
# numbabn on a real NVIDIA GPU, in one call of a lent machine (see CONTRIBUTING in docs/):
# the CUDA tests with the simulator off, the GPU self-check and timing table, the bench table
# of the GPU backends, and the asv benchmarks' GPU grid points run without asv.  Each step
# is time-boxed so one hang cannot eat the lease; logs go to $OUT (or ./gpu-logs).
#
#   bash tools/gpu_check.sh            # everything, about 6 minutes on an H100/H200
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-logs}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NUMBA_ENABLE_CUDASIM=0
PY=${PY:-python3}
status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit} s)"
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n "${TAIL:-25}" "$OUT/$name.log"
  echo "== $name: rc $rc, $((SECONDS - start)) s"
  [ $rc -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
# numba-cuda older than numbabn's floor (0.30): install a carried wheel (.whl/, see docs).
$PY - <<'PY' || { $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/numba_cuda-*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH; }
import numba, numba_cuda, numpy, sys
print("python", sys.version.split()[0], "numba", numba.__version__, "numba-cuda", numba_cuda.__version__, "numpy", numpy.__version__)
sys.exit(0 if tuple(map(int, numba_cuda.__version__.split(".")[:2])) >= (0, 30) else 1)
PY
$PY -c "import numba, numba_cuda, torch; from numba import cuda; print('numba', numba.__version__, 'numba-cuda', numba_cuda.__version__, 'torch', torch.__version__, 'cudnn', torch.backends.cudnn.version()); cuda.detect()"

step test_cuda 180 $PY -m pytest tests/test_cuda.py tests/test_bench.py -q -n 8 -p no:cacheprovider -rs
step check_cuda 100 $PY -m numbabn check --device cuda
step bench_gpu 120 $PY -c "
import numpy as np, json, sys
from numbabn import _bench
r = _bench.run(_bench.SHAPES, budget=0.3, names=['numbabn-cuda', 'torch-cuda'])
json.dump(r, open('$OUT/bench_gpu.json', 'w'), default=float)
"
TAIL=12 step asv_gpu 100 bash -c "$PY tools/asv_grid.py --backend cuda torch-cuda --size small medium &&
  $PY tools/asv_grid.py --backend cuda torch-cuda --dtype float64"
exit $status
