#!/usr/bin/env bash
# Set up corrdiff-archive on a fresh Linux machine with Python 3.11:
# a virtual environment in .venv with the pinned dependencies and the test tools, and
# LPIPS's real ImageNet backbone weights in torch's cache (they cannot be downloaded from
# their usual place here; see docs/install.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || { echo "corrdiff-archive needs Python 3.11 (found $("$PYTHON" --version))" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]"
.venv/bin/python scripts/install_lpips_weights.py
echo "corrdiff-archive is set up: run .venv/bin/python -m pytest"
