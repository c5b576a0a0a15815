#!/usr/bin/env bash
# The GPU checks on a CUDA machine whose image has torch, triton and transformers but no network and no venv of ours
# (the lent device's bare image, where `make gpu-kit` cannot install the lock): the missing pure-Python wheels come
# in .whl/ (hydra-core, omegaconf, antlr4, fla; see eval/README.md), kernels/ is linked under hybridlm/kernels as the
# install would map it, and each step runs under its own limit, the quickest verdicts first: hybridlm doctor
# model=gpu_1b, one GDN call per implementation and dtype (eval/bench/gdn_gpu_probe.py), the GDN kernel benchmark,
# the gpu-marked tests. Everything lands in $OUT (default eval/bench/results/bare_gpu_kit). About 9 minutes.
set -u
OUT=${OUT:-eval/bench/results/bare_gpu_kit}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 WANDB_MODE=disabled
ln -sfn ../../kernels/gated_delta hybridlm/kernels/gated_delta
ln -sfn ../../kernels/moe hybridlm/kernels/moe
{
    date -u; echo "commit ${COMMIT:-unknown}"; nvidia-smi -L
    python3 -c "import torch, triton, transformers, fla; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__, 'transformers', transformers.__version__, 'fla', fla.__version__,
torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
} 2>&1 | tee "$OUT/env.txt"
# Compilation and autotuning dominate the doctor's first run (56 s for the GDN chunk alone on an H200).
timeout --signal=INT --kill-after=10 150 python3 -m hybridlm.cli doctor model=gpu_1b --json "$OUT/doctor.json" \
    > "$OUT/doctor.log" 2>&1
echo "doctor exit $?"; tail -25 "$OUT/doctor.log"
# Each call in its own process: an illegal memory access poisons the CUDA context for everything after it.
for case in "ours bfloat16" "fla bfloat16" "ours float32"; do
    CUDA_LAUNCH_BLOCKING=1 timeout -k 5 75 python3 eval/bench/gdn_gpu_probe.py $case >> "$OUT/probe.log" 2>&1
    echo "probe $case exit $?" | tee -a "$OUT/probe.log"
done
tail -40 "$OUT/probe.log"
timeout --signal=INT --kill-after=10 60 python3 eval/bench/gated_delta.py --out "$OUT/gated_delta.json" \
    > "$OUT/bench.log" 2>&1
echo "gated_delta exit $?"; tail -12 "$OUT/bench.log"
timeout --signal=INT --kill-after=10 240 python3 -m pytest -m gpu -q -p no:cacheprovider --timeout=120 -rfEs \
    --continue-on-collection-errors --junitxml="$OUT/test_gpu.xml" \
    tests/kernels/test_gated_delta_triton.py tests/kernels/test_moe_triton.py tests/kernels/test_gated_delta_fla_conventions.py \
    tests/test_attention.py tests/test_doctor.py tests/test_generate.py tests/test_kernel_check.py \
    > "$OUT/test_gpu.log" 2>&1
echo "test_gpu exit $?"; tail -45 "$OUT/test_gpu.log"
