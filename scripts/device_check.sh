#!/usr/bin/env bash
# Every check that needs the lent GPU machine, in phases that each fit one device call (< 10 min):
#
#   bash scripts/device_check.sh PHASE      (PHASE: gpu | plan-shard | tune | all)
#
#   gpu         install; nvidia-smi; the CUDA tests (tests/test_swap_cuda.py: exactness, and issue 21's
#               checks: swap-in active bytes, forward peak vs swap_out_window, stalls behind slow nodes,
#               no CPU block at step end, pinned pool vs host_memory_stats, graph capture, race guards;
#               pytest summary and junit XML kept); scripts/bench_swap.py --gpu-only (bandwidth first,
#               largest batch under a cap with and without the engine, oversubscription, vs save_on_cpu).
#               Both fit one device call: 240 s + 330 s.
#   plan-shard  scripts/bench_plan.py (predicted vs max_memory_allocated) and
#               scripts/bench_shard.py --offload-only (FSDP2 CPU offload on one GPU vs replicate)
#   tune        scripts/bench_tune.py on the machine's CPU cores (the 16-core run issue 14 asks for)
#
# Each phase writes its logs, tables and PNGs under $OUT/<phase>/ (the device tool brings $OUT back) and
# prints a short digest. Without CUDA the gpu and plan-shard phases stop with one line (exit 2).
set -uo pipefail
cd "$(dirname "$0")/.."
PHASES="gpu plan-shard tune"
phase=${1:-}
OUT=${OUT:-runs/device}
PY=${PYTHON:-python3}

die() { echo "device_check: error: $*" >&2; exit 2; }

case " $PHASES all " in
  *" $phase "*) ;;
  *) die "phase: expected one of: $PHASES all; got '${phase}'" ;;
esac

needs_cuda() {
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null ||
    die "$1: no CUDA device here (torch.cuda.is_available() is False); run it on the lent GPU machine"
}

install() {
  mkdir -p "$OUT"
  if ! "$PY" -c "import lmsdp.launcher" 2>/dev/null; then
    "$PY" -m pip install --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 ||
      { tail -20 "$OUT/install.log"; die "install failed (see $OUT/install.log)"; }
  fi
}

# step NAME LIMIT_S CMD...: run with a time limit, keep the whole log, print its tail
step() {
  local name=$1 limit=$2 dir=$3; shift 3
  mkdir -p "$dir"
  local started=$SECONDS
  timeout "$limit" "$@" >"$dir/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - started)) s (log: $dir/$name.log)"
  tail -n 40 "$dir/$name.log"
  return 0
}

phase_gpu() {
  needs_cuda gpu
  local dir="$OUT/gpu"
  mkdir -p "$dir"
  nvidia-smi >"$dir/nvidia-smi.txt" 2>&1
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" \
    | tee "$dir/versions.txt"
  step cuda_tests 240 "$dir" "$PY" -m pytest -q -rs tests/test_swap_cuda.py tests/test_plan.py tests/test_report.py \
    -m "not integration" --junitxml "$dir/cuda_tests.xml"
  step bench_swap 330 "$dir" "$PY" scripts/bench_swap.py --gpu-only --out-dir "$dir"
}

phase_plan_shard() {
  needs_cuda plan-shard
  local dir="$OUT/plan-shard"
  mkdir -p "$dir"
  step bench_plan 300 "$dir" "$PY" scripts/bench_plan.py --png "$dir/bench_plan.png"
  if command -v mpirun >/dev/null; then
    step bench_shard 270 "$dir" "$PY" scripts/bench_shard.py --offload-only --runs 1 --out "$dir"
  else
    echo "== bench_shard: skipped, no mpirun on this machine"
  fi
}

phase_tune() {
  local dir="$OUT/tune"
  mkdir -p "$dir"
  command -v mpirun >/dev/null || die "tune: no mpirun on this machine (trials with 2+ ranks need it)"
  nproc >"$dir/cores.txt"
  # the whole 16-core space is ~400 settings: both searches get the same 50-setting space (ranks 1, 2, 4,
  # 8, 16 x their thread counts x inter-op x binding, batch 16) so the sweep fits one device call
  step bench_tune 540 "$dir" "$PY" scripts/bench_tune.py --workloads resnet18 --ranks 1,2,4,8,16 --max-batch 16 \
    --budget 90 --repeats 3 --steps 20 --out "$dir/bench_tune.json"
}

install
case $phase in
  gpu) phase_gpu ;;
  plan-shard) phase_plan_shard ;;
  tune) phase_tune ;;
  all) phase_gpu; phase_plan_shard; phase_tune ;;
esac
