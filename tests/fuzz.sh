#!/usr/bin/env bash
# Short fuzz runs of every Fuzz* target, each seeded by its testdata corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
t=${1:-10s}
grep -rl --include='*_test.go' '^func Fuzz' sidecar | while read -r f; do
  pkg=./$(dirname "$f")
  for fn in $(grep -o '^func Fuzz[A-Za-z0-9_]*' "$f" | awk '{print $2}'); do
    echo "fuzz: $pkg $fn ($t)"
    # Go's fuzzing coordinator can end a timed run with a bare "context
    # deadline exceeded" when the time runs out while a worker is busy,
    # with no failing input: that one outcome is run again, once. A
    # real failure writes its input to testdata and fails as before.
    if ! out=$(go test -run='^$' -fuzz="^${fn}\$" -fuzztime="$t" "$pkg" 2>&1); then
      echo "$out"
      if grep -q 'context deadline exceeded' <<<"$out" && ! grep -q 'Failing input' <<<"$out"; then
        echo "fuzz: $fn: the coordinator timed out without a failing input; running again"
        go test -run='^$' -fuzz="^${fn}\$" -fuzztime="$t" "$pkg"
      else
        exit 1
      fi
    else
      echo "$out" | tail -3
    fi
  done
done
