#!/usr/bin/env bash
# The GPU work waiting for a session lent a GPU (#27's figures, then the smoke run), as prepared commands.
#
# The lent machine has torch (CUDA), transformers, peft and accelerate, no network, 15 minutes of device time in
# all (its start included), and takes at most 64 MiB per call. The wheels it lacks are 102 MiB, so they travel in
# two calls made back to back (a warm machine keeps what the first installed under the ignored .gpu-site/):
#
#   here, once:  python bench/gpu_smoke.py --build_wheels wheels/a --python_version 3.12    # trl, datasets, ...: 61 MiB
#                pip download --no-deps --only-binary=:all: -d wheels/b bitsandbytes==0.50.2 \
#                    --python-version 3.12 --platform manylinux_2_24_x86_64                  # 41 MiB
#   device run 1 (carry wheels/a):  bash bench/gpu_session.sh install wheels/a
#   device run 2 (carry wheels/b):  bash bench/gpu_session.sh install wheels/b && bash bench/gpu_session.sh run 500
#
# `run SECONDS` spends at most SECONDS, in this order, each step in what is left: bench/gpu_dpo.py's headline
# scenario (qlora_7b_1024: alignkit's defaults, stock TRL and alignkit on the attention auto chose before
# flex_attention, one round at a fixed batch), dense_1b (MFU), qlora_7b_2048, then bench/gpu_smoke.py. What each
# wrote lands in $OUT (the device tool brings it back); record it in bench/gpu_dpo.md and bench/gpu_smoke.md.
# GPU_SESSION_CPU=1 runs the same steps at toy size on a CPU (tests/test_gpu_dpo_bench.py: the plumbing works).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_session}
SITE=$PWD/.gpu-site
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python}

case "${1:-}" in
install)
  shift
  mkdir -p "$SITE"
  for folder in "$@"; do
    "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$folder"/*.whl || exit 1
  done
  "$PY" -c "import importlib.util as u; print('installed; missing:', [m for m in ('trl', 'datasets', 'dotenv', \
'bitsandbytes') if u.find_spec(m) is None] or 'none')"
  ;;
run)
  budget=${2:?usage: bench/gpu_session.sh run SECONDS}
  mkdir -p "$OUT"
  work=${WORK:-/tmp/gpu-session-work}  # the random models, written once, shared by the steps
  if [ -n "${GPU_SESSION_CPU:-}" ]; then
    dpo=(--cpu-smoke) smoke=(--cpu --steps 2)
  else
    dpo=(--rounds 1 --steps 4 --batch 8) smoke=(--steps 20)
  fi
  step() {  # step NAME COMMAND...: run it in what is left of the budget, its log in $OUT/NAME.log
    local name=$1 left=$((budget - SECONDS))
    shift
    if [ "$left" -lt 30 ]; then
      echo "$name: not run (${left} s of the budget left)" | tee -a "$OUT/summary.txt"
      return
    fi
    echo "$name: up to ${left} s" >&2
    timeout --kill-after=10 "$left" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc after $SECONDS s of the session" | tee -a "$OUT/summary.txt"
    tail -n 25 "$OUT/$name.log"
  }
  for scenario in qlora_7b_1024 dense_1b qlora_7b_2048; do
    step "gpu_dpo-$scenario" "$PY" bench/gpu_dpo.py --only "$scenario" "${dpo[@]}" --work "$work" \
      --out "$OUT/gpu_dpo-$scenario"
  done
  # The smoke run's folders hold models and runs: only its summary and logs come back.
  step gpu_smoke "$PY" bench/gpu_smoke.py "${smoke[@]}" --out "$work/gpu_smoke"
  mkdir -p "$OUT/gpu_smoke" && cp "$work"/gpu_smoke/summary.txt "$work"/gpu_smoke/*.log "$OUT/gpu_smoke/" 2>/dev/null
  ;;
*)
  sed -n '2,20p' "$0"
  exit 2
  ;;
esac
