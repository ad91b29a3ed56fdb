#!/bin/bash
# held.sh: base against the new build, compressed snapshots (every 2,000 entries, growth 0), 180 s, logs kept.
cd /work/main
OUT=/work/perf/held; mkdir -p $OUT
for tag in base dt; do
  rm -rf /work/soak-tmp/*
  TMPDIR=/work/soak-tmp /work/bin/load-new --habar-bin /work/bin/habar-$tag --spawn 3 --quiet --node-arg=--shards=4 \
    --node-arg=--snapshot-logs-since-last=2000 --node-arg=--snapshot-growth-percent=0 --keep-data \
    --scenario loadtest/scenarios/one-to-one.toml --duration 180s --json $OUT/$tag.json > $OUT/$tag.txt 2>&1
  d=$(ls -d /work/soak-tmp/habar-load-* | head -1)
  grep -h 'snapshot built' $d/n*.log > $OUT/$tag-builds.txt
  rm -rf /work/soak-tmp/*
  echo "== $tag"; grep -iE "^ *publish|rss" $OUT/$tag.txt | head -3
done
