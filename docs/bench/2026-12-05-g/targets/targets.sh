#!/bin/bash
# targets.sh BIN OUTDIR: the targets, one run each.
set -u
BIN=$1; OUT=$2; LOADER=${LOADER:-/work/bin/load-new}; S=/work/main/loadtest/scenarios
mkdir -p "$OUT"
run() { name=$1; shift; TMPDIR=/work/soak-tmp "$LOADER" --habar-bin "$BIN" --spawn 3 --quiet --node-arg=--shards=4 --json "$OUT/$name.json" --plot "$OUT/$name.svg" "$@" > "$OUT/$name.txt" 2>&1; rm -rf /work/soak-tmp/habar-load-*; echo "== $name"; grep -iE "^ *publish|rss" "$OUT/$name.txt" | head -5; }
run one-to-one --scenario $S/one-to-one.toml --duration 60s
run million-conversations --scenario $S/million-conversations.toml --duration 60s
run million-once --scenario $S/million-once.toml
run open --scenario $S/one-to-one.toml --mode open --rate 20000/s --duration 30s
run single --scenario $S/single.toml --duration 20s
