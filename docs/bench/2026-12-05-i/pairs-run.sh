#!/bin/bash
# pairs.sh: one-to-one for 35 s against million-once (a million conversations, each once), alternating, three rounds; BIN, LOADER, OUT from the environment.
cd /work/main
OUT=${OUT:-/work/perf/pairs}; mkdir -p $OUT; S=loadtest/scenarios
for r in 1 2 3; do
  for sc in one-to-one million-once; do
    extra=""; [ $sc = one-to-one ] && extra="--duration 35s"
    rm -rf /work/soak-tmp/*
    TMPDIR=/work/soak-tmp ${LOADER:-/work/bin/load-new} --habar-bin ${BIN:-/work/bin/habar-dt2} --spawn 3 --quiet --node-arg=--shards=4 \
      --scenario $S/$sc.toml $extra --json $OUT/$sc-$r.json > $OUT/$sc-$r.txt 2>&1
    echo "== $sc-$r"; grep -E "^ *publish|^measured" $OUT/$sc-$r.txt | head -2
  done
done
rm -rf /work/soak-tmp/*
