#!/usr/bin/env bash
# make bench: every benchmark section, each printing our figure beside the
# anchor measured in the same run and their ratio.
set -euo pipefail
cd "$(dirname "$0")/../.."
for s in tests/bench/bench-*.sh; do
  echo "=== $(basename "$s" .sh)"
  bash "$s"
done
