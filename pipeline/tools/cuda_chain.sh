#!/usr/bin/env bash
# The full CIFAR-10 chain of experiment=cifar10_converged on one GPU, in one go:
#   bash pipeline/tools/cuda_chain.sh <cifar10-jpg folder> <results folder> [pipeline overrides...]
# 1. env.txt: GPU, CPU, versions; bench_train.txt: the train loop vs a bare AMP loop (target >= 0.80)
# 2. the baseline (200 epochs) and its pruned model, then in parallel on the same GPU:
#    - the chain to validate (distill seed 0, QAT, export, validate at 2 ORT threads)
#    - a second pruning budget (prune.target_macs=1.2e7) through the same chain
#    - KD vs no KD on seeds 0, 1, 2 (pipeline.tools.kd_seeds)
# 3. results.tar.gz: reports, metrics and ONNX/PyTorch artifacts (no resume checkpoints, no data cache)
# Small GPU models are bound by kernel launches, not by the GPU, so parallel processes share it well.
# Extra overrides go to every pipeline run (e.g. train.epochs=2 for a smoke test).
set -uo pipefail
data=$(realpath "$1"); res=$(realpath -m "$2"); shift 2
mkdir -p "$res"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python}
dev=${DEVICE:-cuda}; amp=$([ "$dev" = cuda ] && echo bf16 || echo off)  # DEVICE=cpu: a smoke test of this script
common=(experiment=cifar10_converged "data.root=$data" device=$dev progress=false "paths.outputs=$res/outputs"
        validate.threads=2 "$@")
step() { echo "[$(date +%T)] $*" | tee -a "$res/steps.txt"; }

step "environment"
{ nvidia-smi -L; lscpu | grep "Model name"; nproc
  $py -c "import torch, torchvision, onnxruntime, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'torchvision', torchvision.__version__, 'onnxruntime', onnxruntime.__version__, 'python', platform.python_version())"
} > "$res/env.txt" 2>&1

step "train + prune (the shared upstream; decodes the images once into the cache)"
$py -m pipeline "${common[@]}" stage=prune hydra.run.dir="$res/runs/upstream" > "$res/upstream.log" 2>&1 \
  || { step "upstream failed"; tail -20 "$res/upstream.log"; exit 1; }

step "train-loop benchmark (pipeline vs bare AMP loop)"
$py -m pipeline.tools.bench_train --device "$dev" --amp "$amp" --data-root "$data" --batch 256 --steps "${BENCH_STEPS:-100}" \
  --rounds 3 --cache-dir "$res/outputs/cache" > "$res/bench_train.txt" 2>&1 || step "bench_train failed"

step "in parallel: chain (seed 0), chain at 1.2e7 MACs, KD vs no KD on 3 seeds"
export OMP_NUM_THREADS=2  # eight processes share the CPU cores; their GPU work needs few CPU threads
$py -m pipeline "${common[@]}" distill.seed=0 hydra.run.dir="$res/runs/chain" > "$res/chain.log" 2>&1 &
a=$!
$py -m pipeline "${common[@]}" distill.seed=0 prune.target_macs=1.2e7 hydra.run.dir="$res/runs/chain_1.2e7" \
  > "$res/chain_1.2e7.log" 2>&1 &
b=$!
$py -m pipeline.tools.kd_seeds --seeds 0,1,2 --jobs 6 --out "$res/kd_seeds" -- "${common[@]}" \
  > "$res/kd_seeds.txt" 2>&1 &
c=$!
wait $a && step "chain done" || step "chain failed"
wait $b && step "chain 1.2e7 done" || step "chain 1.2e7 failed"
wait $c && step "kd_seeds done" || step "kd_seeds failed"

step "packing results"
(cd "$res" && tar czf results.tar.gz --exclude='*.work' --exclude='*.lock' --exclude=cache \
  steps.txt env.txt bench_train.txt ./*.log kd_seeds.txt kd_seeds runs outputs/artifacts 2>/dev/null)
grep -h "report:\|median ratio\|over 3 seeds" "$res"/*.log "$res"/*.txt
step "done"
