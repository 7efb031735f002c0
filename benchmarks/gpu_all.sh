#!/usr/bin/env bash
# Every GPU benchmark in one go, each bounded in time, each result written to OUT_DIR as it is measured
# (a timeout or a crash in one stage keeps what the earlier stages wrote, and the next stage still runs):
#
#   benchmarks/gpu_all.sh OUT_DIR            # CUDA GPU: w2v-bert-2.0's shape, random weights (~8 min on an H200)
#   benchmarks/gpu_all.sh OUT_DIR --cpu      # the same stages on a CPU with the tiny model (checks the script, ~3 min)
#
# Stages: 1. throughput.py (gpu_fast vs seed, and our pipeline vs a bare loop), 2. gpu_varlen.py
# (random / bucketed / bounded / fixed batches), 3. gpu_varlen.py --profile (host costs, GPU syncs).
# Per-stage limits in seconds: THROUGHPUT_S, VARLEN_S, PROFILE_S. PYTHON picks the interpreter.
set -u
out=${1:?usage: benchmarks/gpu_all.sh OUT_DIR [--cpu]}
mode=${2:-}
py=${PYTHON:-python}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

if [ "$mode" = "--cpu" ]; then
    gpu=()
    throughput=(--rounds 1 --steps 6 --warmup 2 --threads 2)
    varlen=(--utterances 48 --epochs 1 --warmup 1 --threads 2)
    profile=(--profile-steps 3 --threads 2)
else
    gpu=(--gpu)
    throughput=(--rounds 2 --steps 20 --warmup 4)
    varlen=(--utterances 512 --epochs 1 --warmup 3)
    profile=(--profile-steps 6)
fi

stage() {  # stage NAME LIMIT_S COMMAND...: runs COMMAND under a time limit, its output in OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "== $name (limit ${limit}s): $*" | tee -a "$out/summary.txt"
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start))s" | tee -a "$out/summary.txt"
    tail -n 4 "$out/$name.log" | tee -a "$out/summary.txt"
}

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    "$py" -c 'import sys, torch, transformers; print("python", sys.version.split()[0], "| torch", torch.__version__,
"| transformers", transformers.__version__, "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")'
    nproc
} 2>&1 | tee "$out/summary.txt"

stage throughput "${THROUGHPUT_S:-230}" "$py" "$here/throughput.py" "${gpu[@]}" "${throughput[@]}" \
    --out "$out/throughput.jsonl"
stage varlen "${VARLEN_S:-190}" "$py" "$here/gpu_varlen.py" "${gpu[@]}" "${varlen[@]}" --out "$out/varlen.jsonl"
stage profile "${PROFILE_S:-70}" "$py" "$here/gpu_varlen.py" "${gpu[@]}" --profile "${profile[@]}"
echo "done: $out" | tee -a "$out/summary.txt"
