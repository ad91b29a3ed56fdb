#!/bin/bash
# The view-ab-*.txt runs: 7e1e947 (a) against a build of the view change alone (b: cb127a0's first part, never committed by itself), one round each time, run twice (ab-2pass, ab-2pass-r2):
#   view-ab-run.sh OUT 1 /work/bin/habar-base /work/bin/habar-2pass -- --node-arg=--snapshot-logs-since-last=2000 --node-arg=--snapshot-growth-percent=0 --scenario loadtest/scenarios/one-to-one.toml --duration 180s
# ab2.sh OUT ROUNDS BIN_A BIN_B -- <habar-load flags>: alternate two node builds.
set -u
OUT=$1; ROUNDS=$2; A=$3; B=$4; shift 4; [ "${1:-}" = "--" ] && shift
LOADER=${LOADER:-/work/bin/load-new}
mkdir -p "$OUT"
for r in $(seq 1 "$ROUNDS"); do
  for tag in a b; do
    if [ $tag = a ]; then bin=$A; else bin=$B; fi
    TMPDIR=/work/soak-tmp "$LOADER" --habar-bin "$bin" --spawn 3 --quiet --node-arg=--shards=4 --json "$OUT/$tag-$r.json" "$@" > "$OUT/$tag-$r.txt" 2>&1
    rm -rf /work/soak-tmp/habar-load-*
    echo "== $tag-$r"; grep -iE "^ *publish|rss" "$OUT/$tag-$r.txt" | head -4
  done
done
