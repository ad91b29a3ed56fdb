#!/bin/bash
# Compressed time: a snapshot after at least 2,000 entries (not 20,000), 300 s, the same
# binary with snapshot_growth_percent 0 (entries alone) and 100.
cd /work/main
for g in 0 100; do
  TMPDIR=/work/soak-tmp /work/bin/load-new --habar-bin /work/bin/habar-growth --spawn 3 --quiet --node-arg=--shards=4 \
    --node-arg=--snapshot-logs-since-last=2000 --node-arg=--snapshot-growth-percent=$g --keep-data \
    --scenario loadtest/scenarios/one-to-one.toml --duration 300s \
    --json /work/perf/compressed/g$g.json --plot /work/perf/compressed/g$g.svg > /work/perf/compressed/g$g.txt 2>&1
  d=$(ls -d /work/soak-tmp/habar-load-* | head -1)
  mkdir -p /work/perf/compressed/g$g-logs; cp $d/n*.log /work/perf/compressed/g$g-logs/
  du -sh $d/n1/wal $d/n1/sm $d/n1/sm/snapshots > /work/perf/compressed/g$g-du.txt
  rm -rf /work/soak-tmp/habar-load-*
done
