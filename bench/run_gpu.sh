#!/usr/bin/env bash
# Run the GPU checks and benchmarks in one go on a CUDA machine (how the committed results were made).
#   bash bench/run_gpu.sh [tests|bench|all] [pytest -k expression]
# Wheels for packages the machine lacks (diffusers, liger-kernel) go in .whl/ beforehand: bench/gpu_wheels.sh
# fetches them; name .whl in the device call's carry.
# One device command may run 10 minutes: split a full run by -k, e.g. (the owed figures of issues 4-8)
#   bash bench/run_gpu.sh tests "not every_gpu_config"           # bf16 correctness of every kernel
#   bash bench/run_gpu.sh tests "every_gpu_config"               # each autotune config (TMA and pointer)
#   bash bench/run_gpu.sh bench "linear_argmax or glue"          # argmax / two-level sampler, glue GB/s
#   bash bench/run_gpu.sh bench "linear_cross_entropy"           # vs Liger: time and peak memory
#   bash bench/run_gpu.sh bench "modality_ffn"                   # fwd, fwd_bwd, varlen
#   bash bench/run_gpu.sh bench "joint_attention and not wan14b"
#   bash bench/run_gpu.sh bench "model_step and 480p or cached_text_step"   # then "caption"
# (the cached text step is a model_step / wan1.3b-480p record: it must run with that pair's others)
# With 15 minutes of device time in all (start ~2-3 min), one call of ~580 s fits, e.g.
#   UNIVIGU_COMMIT=<sha> UNIVIGU_BUDGET_S=220 bash bench/run_gpu.sh tests "";
#   UNIVIGU_COMMIT=<sha> UNIVIGU_BUDGET_S=330 bash bench/run_gpu.sh bench "linear_argmax or glue or modality_ffn"
# and the other groups go to later sessions. After EVERY call, copy its returned results file over the one
# of the same name in bench/results/ before the next call (the working tree travels to the device: the
# next call starts from it; a call that started from the older file would return one without the first
# call's groups), and commit it before the session ends.
# All sessions' groups merge into one file per device: the device's newest committed results file
# (bench/_common.py results_path; a device without one gets <device>-<date>.json). That one file is
# written to $OUT after every record (UNIVIGU_RESULTS_DIR), starting from the committed file, so a call
# stopped at the device's time limit still brings back what it measured; records of an (op, shape)
# measured again replace the older ones, the other groups' records stay. $OUT gets that file, env.txt,
# install.log, tests.log and bench.log (at most 8 files come back from a device call).
# UNIVIGU_BUDGET_S (default 540, under the device's 10-minute command limit) is the whole call's budget:
# each pytest run gets the time left and stops itself then (SIGINT: it still prints its summary); with
# pytest-timeout installed one test is stopped after 240 s. The device copy of the tree has no .git: give the commit,
# UNIVIGU_COMMIT=<sha> bash bench/run_gpu.sh ...
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
kexpr=${2:-}
case "$what" in
  tests|bench|all) ;;
  *) echo "usage: bash bench/run_gpu.sh [tests|bench|all] [pytest -k expression] (got '$what')" >&2; exit 2 ;;
esac
budget_s=${UNIVIGU_BUDGET_S:-540}
min_step=${UNIVIGU_MIN_STEP_S:-20}  # a step with less time left is not started (it would die importing torch)
case "$budget_s$min_step" in
  ''|*[!0-9]*) echo "usage: UNIVIGU_BUDGET_S / UNIVIGU_MIN_STEP_S must be whole seconds, got '$budget_s' / '$min_step'" >&2
               exit 2 ;;
esac
deadline=$(( $(date +%s) + budget_s ))
out=${OUT:-/tmp/univigu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$out/install.log" 2>&1
if ! python3 -c "import univigu_fast.kernels.modality_ffn" 2>/dev/null; then
  # offline machines may lack setuptools' build deps: run from the source tree instead
  # (setup.py maps the package univigu_fast.kernels to kernels/; a symlink does the same here)
  echo "editable install unavailable (see $out/install.log): using the source tree on PYTHONPATH"
  [ -e univigu_fast/kernels ] || ln -s ../kernels univigu_fast/kernels
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
timeout_opt=""
python3 -c "import pytest_timeout" 2>/dev/null && timeout_opt="--timeout 240"
workers=""
python3 -c "import xdist" 2>/dev/null && workers="-n ${UNIVIGU_TEST_WORKERS:-8}"  # tests only: benches run alone
time_left() {  # seconds to the deadline; says so and fails when fewer than $min_step are left for step $1
  local left=$(( deadline - $(date +%s) ))
  [ "$left" -ge "$min_step" ] && [ "$left" -gt 0 ] && echo "$left" && return 0
  echo "run_gpu.sh: UNIVIGU_BUDGET_S=$budget_s spent ($left s left): $1 not run" >&2
  return 1
}
if [ -z "${UNIVIGU_COMMIT:-}" ] && ! git rev-parse HEAD >/dev/null 2>&1; then
  echo "WARNING: no git here and UNIVIGU_COMMIT unset: the records' commit will be null"
fi
python3 - <<'PY' | tee "$out/env.txt"
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())
for name in ("torch.nn.attention.varlen", "torch.nn.attention.flex_attention"):
    try:
        __import__(name); print(name, "yes")
    except Exception as e:
        print(name, "no", type(e).__name__)
import torch.nn.functional as F
print("F.grouped_mm", hasattr(F, "grouped_mm"), "torch._grouped_mm", hasattr(torch, "_grouped_mm"),
      "F.linear_cross_entropy", hasattr(F, "linear_cross_entropy"))
PY
rc=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  if budget=$(time_left tests); then
    timeout -s INT -k 15 "$budget" python3 -m pytest tests -q --maxfail=20 $workers $timeout_opt ${kexpr:+-k "$kexpr"} \
      -p no:cacheprovider -rfEs --durations=15 2>&1 | tee -a "$out/tests.log" || rc=1
  else rc=1; fi
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  if budget=$(time_left bench); then
    # the results file starts from the committed one (or from what an earlier run in this call wrote)
    UNIVIGU_RESULTS_DIR="$out" timeout -s INT -k 15 "$budget" python3 -m pytest bench --benchmark-only -q $timeout_opt \
      ${kexpr:+-k "$kexpr"} -p no:cacheprovider -rfEs --durations=15 --benchmark-columns=median,rounds 2>&1 \
      | tee -a "$out/bench.log" || rc=1
  else rc=1; fi
fi
exit $rc
