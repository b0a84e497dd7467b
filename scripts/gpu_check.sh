#!/usr/bin/env bash
# The CUDA check (issue 14), made for one call of the lent GPU machine, whose image has torch but
# reaches no package index (docs/benchmarks.md, "On a CUDA GPU"):
#
#   here:   bash scripts/gpu_wheels.sh        # the packages that image lacks, as wheels in .whl/
#   device: run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600)
#
# Seven steps, each under its own time limit (550 s in all); a failed step is noted and the next one runs.
# The log (with each step's time) and each benchmark's CSV go to $OUT (or results/gpu_check) as each step ends:
#   1. versions and the GPU;  2. the CUDA tests (tests/test_gpu.py);
#   3. flash against torch's SDPA, forward + backward at 4096 and 16384 tokens, three rounds;
#   4, 5. the same, one round, with flash's tiles of 1024 and 4096 keys (the default, 256, suits a CPU);
#   6. every kernel at 4096 tokens, forward + backward, one round;  7. cached decoding at 1024 and 8192 tokens.
# --dry-run: the same steps on the CPU at 64 tokens and fewer mechanisms, to check the script itself
# without a GPU (tests/test_gpu_check.py). PYTHON picks the interpreter (default python3, the GPU
# image's); WHEELS the folder of wheels to install first (default .whl, if it holds any).
set -euo pipefail
start_dir=$PWD
cd "$(dirname "$0")/.."
absolute() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$start_dir/$1" ;; esac; }

# Lengths, rounds and flash's tile sizes; `some` and `decoders` are the mechanisms (empty: every one).
if [ $# -eq 1 ] && [ "$1" = "--dry-run" ]; then
  device=cpu flash_lengths=64 rounds=1 tile_sizes="16 32" min_run_time=0.01
  all_lengths=64 some=flash,torch_sdpa passes=forward decoders=flash,dot_product contexts=32 new_tokens=2
elif [ $# -gt 0 ]; then
  echo "usage: scripts/gpu_check.sh [--dry-run]" >&2
  exit 2
else
  device=cuda flash_lengths=4096,16384 rounds=3 tile_sizes="1024 4096" min_run_time=0.2
  all_lengths=4096 some= passes=forward_backward decoders= contexts=1024,8192 new_tokens=16
fi
PY="${PYTHON:-python3}"
OUT_DIR="$(absolute "${OUT:-results/gpu_check}")"
wheels="$(absolute "${WHEELS:-.whl}")"
if [ -n "${GPU_CHECK_WORK:-}" ]; then
  WORK="$(absolute "$GPU_CHECK_WORK")"
else
  WORK="$(mktemp -d)" && trap 'rm -rf "$WORK"' EXIT
fi  # WORK: the benchmarks' full output (plots too) and the installed wheels; only logs and CSVs go to OUT_DIR
mkdir -p "$OUT_DIR" "$WORK"
log="$OUT_DIR/check.log"
: >"$log"
stop() {  # stop MESSAGE: one line on stderr and in the log (which comes back from the device), exit 1
  echo "gpu_check: $1" | tee -a "$log" >&2
  exit 1
}

if compgen -G "$wheels/*.whl" >/dev/null; then  # carried wheels (scripts/gpu_wheels.sh), installed offline
  while IFS= read -r line; do  # one wheel per pin of requirements-gpu.txt: a folder made before a pin changed is stale
    line="${line%%#*}" && line="${line// /}"
    if [ -z "$line" ]; then continue; fi
    name="${line%%==*}" pin="${line#*==}"
    compgen -G "$wheels/$(printf '%s' "$name" | tr 'A-Z-' 'a-z_')-$pin-*.whl" >/dev/null \
      || stop "$wheels has no wheel of $name==$pin (requirements-gpu.txt); run scripts/gpu_wheels.sh again"
  done <requirements-gpu.txt
  timeout -k 5 60 "$PY" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target "$WORK/site" "$wheels"/*.whl >"$WORK/pip.log" 2>&1 \
    || stop "installing $wheels failed ($(grep -m 1 ERROR "$WORK/pip.log" || tail -n 1 "$WORK/pip.log")); wheels for another Python?"
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
# Every command's module, as `tcompare --help` imports them: a missing or too old package fails here, not in each step.
if ! timeout -k 5 60 "$PY" -c "from transformer_comparison.cli import build_parser; build_parser()" 2>"$WORK/import.log"; then
  stop "$PY cannot import the project ($(tail -n 1 "$WORK/import.log")); run scripts/gpu_wheels.sh here and carry .whl"
fi

failed=()
step() {  # step NAME SECONDS COMMAND...: run it under a time limit into the log; a failure is noted, not fatal
  local name=$1 limit=$2 status=0 started=$SECONDS
  shift 2
  echo "== $name" | tee -a "$log"
  timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$log" || status=$?
  local took=$((SECONDS - started))
  if [ "$status" -ne 0 ]; then
    failed+=("$name")
    echo "== $name: failed with exit status $status after $took s$([ "$status" -eq 124 ] && echo " (its limit: $limit s)")" | tee -a "$log"
  else
    echo "== $name: ok in $took s (limit $limit s)" | tee -a "$log"
  fi
}
keep() {  # keep FILE NAME: copy a benchmark's CSV (written case by case, so partial after a failure) to OUT_DIR
  if [ -f "$1" ]; then cp "$1" "$OUT_DIR/$2"; fi
}

step "1. versions" 30 "$PY" -c "
import sys, torch, pydantic, typing_extensions
from importlib.metadata import version
assert '$device' == 'cpu' or torch.cuda.is_available(), 'no CUDA device visible to torch'
name = torch.cuda.get_device_name() if '$device' == 'cuda' else 'cpu (dry run)'
print(f'python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), device {name}')
print(f'pydantic {pydantic.VERSION}, typing_extensions {version(\"typing_extensions\")}')"
step "2. CUDA tests" 60 "$PY" -m pytest -q -rs -m gpu tests/test_gpu.py
step "3. flash against SDPA" 140 "$PY" -m transformer_comparison bench kernels --device "$device" \
  --mechanisms flash,torch_sdpa --lengths "$flash_lengths" --passes forward_backward --repeats "$rounds" \
  --timeout 60 --min_run_time "$min_run_time" --out "$WORK/flash"
keep "$WORK/flash/kernels.csv" flash_kernels.csv
number=4
for tiles in $tile_sizes; do  # the default tile suits 2 CPU threads; a GPU's launches may want fewer, larger tiles
  step "$number. flash, $tiles-key tiles" 60 "$PY" -m transformer_comparison bench kernels --device "$device" \
    --mechanisms flash,torch_sdpa --lengths "$flash_lengths" --passes forward_backward --repeats 1 --timeout 60 \
    --min_run_time "$min_run_time" --out "$WORK/flash$tiles" "attention.flash.block_size=$tiles"
  keep "$WORK/flash$tiles/kernels.csv" "flash${tiles}_kernels.csv"
  number=$((number + 1))
done
step "$number. every kernel" 110 "$PY" -m transformer_comparison bench kernels --device "$device" \
  ${some:+--mechanisms "$some"} --lengths "$all_lengths" --passes "$passes" --repeats 1 --timeout 60 \
  --min_run_time "$min_run_time" --out "$WORK/all"
keep "$WORK/all/kernels.csv" all_kernels.csv
step "$((number + 1)). cached decoding" 90 "$PY" -m transformer_comparison bench decode --config configs/config.yaml \
  --device "$device" ${decoders:+--mechanisms "$decoders"} --contexts "$contexts" --new_tokens "$new_tokens" \
  --timeout 60 --out "$WORK/decode"
keep "$WORK/decode/decode.csv" decode.csv

if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check: failed: ${failed[*]}; logs and CSVs in $OUT_DIR" | tee -a "$log"
  exit 1
fi
echo "gpu_check: every step passed; logs and CSVs in $OUT_DIR" | tee -a "$log"
