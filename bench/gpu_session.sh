#!/usr/bin/env bash
# One GPU session in one command: bring what the GPU image lacks, run the GPU tests, then the GPU
# benchmark. Results (logs, JSON) go to $OUT (default gpu_out/). See ../shared/GUIDE.md section 8.
#
#   bash bench/gpu_session.sh                 # wheels for nnsight & co. in .whl/ (if the image lacks them)
#   BENCH_ONLY=ceilings,train PYTEST_ARGS=tests/test_gpu_kernels.py bash bench/gpu_session.sh   # a part of each
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
# the project itself: an editable install gives the sc-steer script and the sc_steer_apps package
if ! python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$OUT/install.log" 2>&1; then
  mkdir -p /tmp/site && ln -sfn "$PWD/apps" /tmp/site/sc_steer_apps
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import sys, torch, transformers, nnsight; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| cuda', torch.version.cuda, '| transformers', transformers.__version__, '| nnsight', nnsight.__version__, '|', \
torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
t0=$(date +%s)
timeout "${TEST_TIMEOUT:-330}" python3 -m pytest -p no:cacheprovider -q -m gpu --durations=15 ${PYTEST_ARGS:-} 2>&1 \
  | grep -v "Loading weights" | tee "$OUT/pytest_gpu.log"
echo "pytest -m gpu: exit ${PIPESTATUS[0]} after $(( $(date +%s) - t0 )) s" | tee -a "$OUT/pytest_gpu.log"
timeout "${DEVICES_TIMEOUT:-60}" python3 -m pytest -p no:cacheprovider -q tests/test_devices.py 2>&1 | grep -v "Loading weights" \
  | tee "$OUT/pytest_devices.log" | tail -3
t0=$(date +%s)
timeout "${BENCH_TIMEOUT:-240}" python3 bench/gpu.py --out "$OUT/bench_gpu.json" ${BENCH_ONLY:+--only "$BENCH_ONLY"} \
  2>&1 | grep -v "Loading weights" | tee "$OUT/bench_gpu.log"
echo "bench/gpu.py: exit ${PIPESTATUS[0]} after $(( $(date +%s) - t0 )) s"
