#!/usr/bin/env bash
# The GPU bench in one command, on a lent GPU box with no network:
#
#   bash bench/gpu.sh [gpu_bench.py options]   # device tool: carry ["bench/gpu_payload"], timeout_s 600
#
# bench/gpu_payload (or $GPU_PAYLOAD) comes from bench/prepare_gpu_payload.py, run here first. This installs
# its wheels into a scratch folder, puts their ffmpeg on PATH, and runs bench/gpu_bench.py so
# that everything ends within GPU_BENCH_TOTAL_S seconds (default 480: a 15-minute device
# session also pays the machine's start and gsplat's kernel build comes out of these). Logs,
# results.md, results.json and the profile (profile.txt, two gzipped traces) go to $OUT when it
# is set (the device tool brings them back), else to bench/gpu_out; the table is also appended
# to bench/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
total_s=${GPU_BENCH_TOTAL_S:-480}
python=${PYTHON:-python3}
payload=${GPU_PAYLOAD:-bench/gpu_payload}
out=${OUT:-bench/gpu_out}
site=${TMPDIR:-/tmp}/gstalker-gpu-site
bin=${TMPDIR:-/tmp}/gstalker-gpu-bin
mkdir -p "$out" "$bin"
log=$out/gpu_bench.log
: >"$log"

fail() {
    echo "gpu.sh: $*" | tee -a "$log" >&2
    exit 1
}

[ -f "$payload/payload.json" ] || fail "no $payload/payload.json: run bench/prepare_gpu_payload.py and carry bench/gpu_payload"
# --target leaves the box's environment as it is; --no-deps: the payload holds exactly what the box lacks
"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$payload"/wheels/*.whl >"$out/pip.log" 2>&1 || { cat "$out/pip.log"; fail "pip could not install the carried wheels"; }
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"

# the stored frames are H.264 chunks that gstalker decodes with an `ffmpeg` on PATH; the box has none
ffmpeg_exe=$("$python" -c 'import imageio_ffmpeg; print(imageio_ffmpeg.get_ffmpeg_exe())') \
    || fail "imageio-ffmpeg gives no ffmpeg binary"
chmod +x "$ffmpeg_exe"
ln -sf "$ffmpeg_exe" "$bin/ffmpeg"
export PATH="$bin:$PATH"

# gsplat JIT-builds its CUDA kernels at first use: for this chip alone (Hopper, 9.0), on every core
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 PYTHONUNBUFFERED=1

{
    echo "gpu.sh: wheels installed into $site in $(( $(date +%s) - start )) s"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    nvcc --version | tail -n 2
    ffmpeg -version | head -n 1
} >>"$log" 2>&1

left=$(( total_s - ($(date +%s) - start) ))
# the bench plans to end 30 s before the hard stop; on timeout's SIGTERM it stops the running
# section and still prints the table of what it measured
timeout --signal=TERM --kill-after=20 "$left" "$python" bench/gpu_bench.py --payload "$payload" \
    --budget-s $(( left - 30 )) --results-md "$out/results.md" --results-json "$out/results.json" \
    --append-md bench/RESULTS.md --profile-dir "$out" "$@" 2>&1 | tee -a "$log"
rc=${PIPESTATUS[0]}
echo "gpu.sh: gpu_bench.py exited with $rc after $(( $(date +%s) - start )) s in all" | tee -a "$log"
exit "$rc"
