#!/usr/bin/env bash
# Times OpenMined PSI on this machine in a virtual environment of its own
# (target/baselines-venv), so nothing is installed system-wide.
#   benches/baselines/run-openmined.sh [--registry N] [--queries n]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/../../target/baselines-venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "openmined-psi==2.0.6"
fi
exec "$venv/bin/python" "$here/openmined.py" "$@"
