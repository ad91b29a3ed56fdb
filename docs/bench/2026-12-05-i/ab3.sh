#!/bin/bash
# ab3.sh OUT ROUNDS BIN_A LOAD_A BIN_B LOAD_B -- <habar-load flags>: alternate two (node, tester) builds.
set -u
OUT=$1; ROUNDS=$2; A=$3; LA=$4; B=$5; LB=$6; shift 6; [ "${1:-}" = "--" ] && shift
mkdir -p "$OUT"
for r in $(seq 1 "$ROUNDS"); do
  for tag in a b; do
    if [ $tag = a ]; then bin=$A; ld=$LA; else bin=$B; ld=$LB; fi
    TMPDIR=/work/soak-tmp "$ld" --habar-bin "$bin" --spawn 3 --quiet --node-arg=--shards=4 --json "$OUT/$tag-$r.json" "$@" > "$OUT/$tag-$r.txt" 2>&1
    rm -rf /work/soak-tmp/habar-load-*
    echo "== $tag-$r"; grep -E "^ *publish|rss|µs per" "$OUT/$tag-$r.txt" | head -4
  done
done
