#!/bin/bash
# held2.sh: base against the final build, alternating, two rounds; compressed snapshots (every 2,000 entries, growth 0), 180 s, logs kept.
cd /work/main
OUT=/work/perf/held2; mkdir -p $OUT
for r in 1 2; do
for tag in base dt2; do
  rm -rf /work/soak-tmp/*
  TMPDIR=/work/soak-tmp /work/bin/load-new --habar-bin /work/bin/habar-$tag --spawn 3 --quiet --node-arg=--shards=4 \
    --node-arg=--snapshot-logs-since-last=2000 --node-arg=--snapshot-growth-percent=0 --keep-data \
    --scenario loadtest/scenarios/one-to-one.toml --duration 180s --json $OUT/$tag-$r.json > $OUT/$tag-$r.txt 2>&1
  d=$(ls -d /work/soak-tmp/habar-load-* | head -1)
  grep -h 'snapshot built' $d/n*.log > $OUT/$tag-$r-builds.txt
  rm -rf /work/soak-tmp/*
  echo "== $tag-$r"; grep -iE "^ *publish|rss" $OUT/$tag-$r.txt | head -3
done
done
