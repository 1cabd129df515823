#!/usr/bin/env bash
# The GPU check: one CUDA GPU (sized for an H100/H200: under 8 minutes), SmolLM2-135M-Instruct in bfloat16.
#   bash benchmarks/gpu_check.sh [OUT]        (OUT: default benchmarks/results/gpu_check)
# Needs the project's environment with a CUDA build of torch and DeepSpeed (pip install -e '.[deepspeed]') and the
# All_Beauty files under ./amazon2023 (configs/data/amazon-beauty/processing.yaml). Stages, each logged to
# OUT/<stage>.log, its exit status and seconds in OUT/stages.txt; a failed stage does not stop the next:
# 1. throughput: benchmarks/throughput.py --device cuda (bound, rollouts up to B x G = 64, RecPO step, scoring);
# 2. zero2: `minirec pipeline` on All_Beauty (proxy fit, scoring predict, selection, fit, test against the baselines;
#    64-sample pool, 32 selected, 64 test samples) with DeepSpeed ZeRO-2 on one GPU;
# 3. hf: the same pipeline with Lightning's default single-device strategy (hf rollout engine; vLLM is a GPU extra).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/gpu_check}"
work="$(mktemp -d)"
mkdir -p "$out"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
: > "$out/stages.txt"

stage() {  # stage NAME SECONDS COMMAND...: run COMMAND with a time limit, log it, record its status and duration
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  echo "$name: exit $? after $((SECONDS - start)) s" | tee -a "$out/stages.txt"
}

small=(--config benchmarks/configs/pipeline-beauty-smollm2.yaml --loader.cache_dir "$work/cache"
       --device.accelerator gpu --proxy.subset random:16 --score.pool_size 64 --score.selection.ks '[32]'
       --loader.max_val_samples 32 --loader.max_test_samples 64)
stage throughput 240 python benchmarks/throughput.py --device cuda --cache_dir "$work/cache" --out "$out/throughput"
stage zero2 120 python cli.py pipeline "${small[@]}" --run_dir "$work/zero2" --device.strategy deepspeed_stage_2
stage hf 100 python cli.py pipeline "${small[@]}" --run_dir "$work/hf"
for run in zero2 hf; do cp "$work/$run/report.md" "$out/${run}_report.md" 2>/dev/null; done
