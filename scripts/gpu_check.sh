#!/usr/bin/env bash
# Issue #5's GPU checks in one command of under 10 minutes (H100 / H200, bf16): the CUDA tests with
# the Triton kernel compiled (not interpreted) and CUDA-graph decoding, then the scan, speed and decode
# benchmarks, the Triton kernel beside the PyTorch scan in each, CUDA-graph decoding beside eager. For a
# machine with torch, triton and transformers but no package index: mixcon runs from this checkout with the
# system python3.
#
#   scripts/gpu_check.sh OUT_DIR
#
# Writes OUT_DIR/check.log (everything printed), OUT_DIR/scan/scan.json, OUT_DIR/speed/speed.json (after
# every shape), OUT_DIR/speed-tf32/speed.json, OUT_DIR/speed-compiled/speed.json,
# OUT_DIR/decode/decode.{json,png} and OUT_DIR/decode-compiled/decode.json. Each step has its own time
# limit, so that a slow one leaves the others' results.
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec > >(tee "$out/check.log") 2>&1

step() {  # step SECONDS COMMAND...: run it under a time limit and report how it ended
    local limit=$1 start=$SECONDS
    shift
    echo "=== $* (limit ${limit} s)"
    timeout "$limit" "$@"
    echo "=== exit $? after $((SECONDS - start)) s"
}

nvidia-smi -L
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, '| triton', triton.__version__,
'| transformers', transformers.__version__, '| cuda', torch.cuda.is_available())" || exit 2
python3 -c "import torch; raise SystemExit(not torch.cuda.is_available())" || { echo "no CUDA device"; exit 2; }

step 75 python3 -m pytest -q -p no:cacheprovider tests/ops/test_triton_chunk.py tests/ops/test_conba_scan.py \
    tests/models/test_mixcon.py tests/generation/test_generate.py tests/generation/test_cuda_graphs.py \
    tests/cli/test_generate_cli.py -k "cuda or triton"
# The kernel at 16, 32 and 64 value columns per program (its default: 16, the fewest spills, §17):
step 55 python3 -m mixcon bench scan --device cuda --dtype bf16 --chunks 32,64 --value-blocks 16,32,64 --repeats 10 \
    --out "$out/scan"
step 90 python3 -m mixcon bench speed --device cuda --dtype bf16 --lengths 2048 --batches 1,4 --repeats 10 \
    --reference-max-T 0 --train-step 16x2048 --out "$out/speed"
# The layer hands the Triton kernel fp32 inputs: at torch's default precision it multiplies them in full
# fp32, without tensor cores; with TF32 (both forms, as cuBLAS does then):
step 45 python3 -m mixcon bench speed --device cuda --dtype bf16 --lengths 2048 --batches 1 --repeats 10 \
    --reference-max-T 0 --fp32-precision high --out "$out/speed-tf32"
# Training runs the PyTorch chunked scan, launch-bound at B = 1 (§15: control + tau2 fwd+bwd 0.54x Mamba2,
# train step 0.7 % of peak, eager): the same with torch.compile'd layers and train step.
step 115 python3 -m mixcon bench speed --device cuda --dtype bf16 --lengths 2048 --batches 1 --repeats 10 \
    --reference-max-T 0 --train-step 16x2048 --compile --out "$out/speed-compiled"
# Eager decoding is bound by launching its kernels (§15): the same steps replayed from CUDA graphs beside it.
step 90 python3 -m mixcon bench decode --device cuda --dtype bf16 --contexts 1024,16384 \
    --hf-max-context 1024 --new-tokens 16 --repeats 2 --cuda-graphs --out "$out/decode"
# Compiling the decoding step and the prefill of three models takes minutes on its own (on an H200:
# ~28 s for the first step of `small`, again for the next capacity): one context, no transformers models.
step 125 python3 -m mixcon bench decode --device cuda --dtype bf16 --contexts 1024 --hf-max-context 0 \
    --new-tokens 16 --repeats 2 --compile --out "$out/decode-compiled"
# Their tables are in check.log: what comes back stays within 8 files.
rm -f "$out"/{scan/scan,speed/speed,speed-tf32/speed,speed-compiled/speed,decode-compiled/decode}.png
