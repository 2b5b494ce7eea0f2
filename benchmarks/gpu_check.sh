#!/usr/bin/env bash
# Every GPU check of issue 13 item 7 in one call, for a lent GPU machine (about 6-10 minutes on
# an H200 with a cold start): the CUDA tests, benchmarks/gpu.py (both input layouts), the detector-count
# bootstrap on the GPU (benchmarks/bench_bootstrap.py --device cuda). Logs go to $OUT (the
# device tool's return folder) or to the folder given as $1.
#
# The machine's image has PyTorch, h5py, timm, numba, pandas, seaborn, scipy and pytest but
# not captum; bring its wheel along (pure Python) before the call, in the repository root:
#     echo /.whl/ >> .git/info/exclude
#     .venv/bin/pip download --no-deps -d .whl "captum==$(.venv/bin/pip show captum | sed -n 's/^Version: //p')"
# then run with carry [".whl"] and the command `bash benchmarks/gpu_check.sh`.
set -uo pipefail
out=${OUT:-${1:-gpu_check_out}}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$py" -c "import captum" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    "$py" -c "import sys, torch, numpy; print(sys.version.split()[0], 'torch', torch.__version__,
'numpy', numpy.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
    nproc
} 2>&1 | tee "$out/machine.txt"
rc=0
timeout 240 "$py" -m pytest tests/test_gpu.py -m gpu -q -rs -p no:cacheprovider -o addopts= \
    2>&1 | tee "$out/gpu_tests.log" || rc=1
timeout 200 "$py" benchmarks/gpu.py --n 3000 2>&1 | tee "$out/gpu_bench.log" || rc=1
# the same with channels-last input: does the CPU's default layout pay on the GPU too?
timeout 120 "$py" benchmarks/gpu.py --n 3000 --channels-last 2>&1 \
    | tee "$out/gpu_bench_channels_last.log" || rc=1
# the detector-count bootstrap's weighted sums on the GPU against the CPU path (same rows)
timeout 100 "$py" benchmarks/bench_bootstrap.py --n 3000 10000 --device cuda 2>&1 \
    | tee "$out/gpu_bootstrap.log" || rc=1
exit "$rc"
