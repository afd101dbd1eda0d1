#!/usr/bin/env bash
# The GPU work waiting for a session lent a GPU (#27's figures, then the smoke run), as prepared commands.
#
# The lent machine (bench/gpu_smoke.md) has Python 3.12 with torch (CUDA), transformers, peft, accelerate, pandas,
# pyarrow and xxhash, no network, 15 minutes of device time in all (its start included), and takes at most 64 MiB
# per call. What it lacks, at this project's tested versions (trl, datasets and their dill and multiprocess,
# python-dotenv, bitsandbytes, and transformers, peft and accelerate as tested here), is about 57 MiB of wheels:
#
#   here, once:                     bash bench/gpu_session.sh wheels           # into wheels/ (ignored by git)
#   device run (carry ["wheels"]):  bash bench/gpu_session.sh install wheels && bash bench/gpu_session.sh run 500
#
# `install` puts them under the ignored .gpu-site/ (a warm machine keeps it between calls: a second call within
# 30 s can skip it) and prints what is still missing; datasets needs pyarrow >= 24, so an older pyarrow there is
# named and must come as a wheel too. `run SECONDS` spends at most SECONDS, in this order, each step in what is
# left: bench/gpu_dpo.py's headline scenario (qlora_7b_1024: alignkit's defaults, stock TRL, and alignkit on the
# attention auto chose before flex_attention; one round at a fixed batch), dense_1b (MFU), qlora_7b_2048, then
# bench/gpu_smoke.py. What each wrote lands in $OUT (the device tool brings it back); record it in
# bench/gpu_dpo.md and bench/gpu_smoke.md. GPU_SESSION_CPU=1 runs the same steps at toy size on a CPU
# (tests/test_gpu_dpo_bench.py: the plumbing works).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_session}
SITE=$PWD/.gpu-site
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}  # the lent machine's python3 holds its torch

case "${1:-}" in
wheels)
  folder=${2:-wheels}  # WHEEL_PYTHON: the lent machine's Python (3.12); this machine's for a rehearsal here
  pins=$("$PY" -c "from importlib.metadata import version as v; print(' '.join(f'{n}=={v(n)}' for n in ('trl', \
'datasets', 'dill', 'multiprocess', 'python-dotenv', 'bitsandbytes', 'transformers', 'peft', 'accelerate')))") || exit 1
  # shellcheck disable=SC2086 - the pins are words
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${WHEEL_PYTHON:-3.12}" --implementation cp -d "$folder" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any $pins || exit 1
  du -sh "$folder"
  ;;
install)
  shift
  mkdir -p "$SITE"
  for folder in "$@"; do
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$folder"/*.whl || exit 1
  done
  "$PY" - <<'EOF'
import importlib.util
from importlib.metadata import version

missing = [m for m in ("trl", "datasets", "dotenv", "bitsandbytes", "pandas", "xxhash") if not importlib.util.find_spec(m)]
pyarrow = version("pyarrow") if importlib.util.find_spec("pyarrow") else None
if pyarrow is None or int(pyarrow.split(".")[0]) < 24:
    missing.append(f"pyarrow >= 24 (datasets needs it; here: {pyarrow})")
print("installed; missing:", "; ".join(missing) or "nothing")
EOF
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
  sed -n '2,19p' "$0"
  exit 2
  ;;
esac
