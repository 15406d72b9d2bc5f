#!/usr/bin/env bash
# One prepared call for a lent GPU machine (docs/training.md): install the carried wheels it
# lacks, then train CONFIG for SECONDS (default 360), check the exported model and benchmark
# it; everything, this output included, goes to $OUT (default runs/device).
#
#   scripts/device_train.sh CONFIG [SECONDS] [scripts/device_train.py options...]
#
# On the device, carry [".whl", "data/pack"] (scripts/device_prepare.py makes .whl/; the
# pack comes from scripts/build_training_pack.py). Here, the CPU rehearsal runs the same
# script (tests/test_device_train.py). PYTHON picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
config=${1:?usage: scripts/device_train.sh CONFIG [SECONDS] [options]}
budget=${2:-360}
shift
[ $# -gt 0 ] && shift
out=${OUT:-runs/device}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
{
  echo "== scripts/device_train.sh $config $budget $* ($(date -u +%FT%TZ))"
  # A carried wheel is installed only where its distribution is not installed (a CPU venv has
  # them all); by distribution name, which is not always the module's (pillow_jxl_plugin).
  missing=()
  for wheel in .whl/*.whl; do
    [ -e "$wheel" ] && missing+=("$wheel")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    mapfile -t missing < <("$py" -c 'import importlib.metadata, os, sys
for wheel in sys.argv[1:]:
    try:
        importlib.metadata.distribution(os.path.basename(wheel).split("-")[0])
    except importlib.metadata.PackageNotFoundError:
        print(wheel)' "${missing[@]}")
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "${missing[@]}" || { echo "FAILED: wheel install"; exit 3; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  "$py" scripts/device_train.py "$config" --seconds "$budget" --out "$out" "$@"
} 2>&1 | tee "$out/device.log"
exit "${PIPESTATUS[0]}"
