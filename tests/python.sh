#!/usr/bin/env bash
# Python shims: installed with pip, tested with pytest against real os-brick and nova.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
dirs=()
for d in cinder-connector nova-plugin; do
  [ -f "$d/pyproject.toml" ] && { "$PY" -m pip install -q -e "$d"; dirs+=("$d"); }
done
[ ${#dirs[@]} -eq 0 ] && { echo "python: no packages yet"; exit 0; }
"$PY" -m pytest -q "${dirs[@]}"
