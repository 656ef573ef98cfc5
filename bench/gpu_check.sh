#!/usr/bin/env bash
# One check of md4 on a GPU in at most 8 minutes on one H200, printed as one table (bench/gpu_check.py
# says what each section does). Without CUDA, or with --tiny, it runs on the CPU with tiny sizes.
#
#   bench/gpu_check.sh                      # every section; exit status 1 if a row is FAIL, ERROR or TIMEOUT
#   bench/gpu_check.sh --tiny               # seconds, on the CPU (`make test` runs this)
#   bench/gpu_check.sh --sections numerics,throughput --json rows.json
#
# Python: $PYTHON, else the repository's .venv, else python3 (the device machine's python3 holds torch).
# The plays and the GPT-2 merges: see the docstring of bench/gpu_check.py (copy them to .gpucheck/).
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$here/.venv/bin/python" ]; then PYTHON="$here/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$here/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# a hard stop 90 s after the script's own deadline, whatever hangs
exec timeout --kill-after=10 600 "$PYTHON" "$here/bench/gpu_check.py" "$@"
