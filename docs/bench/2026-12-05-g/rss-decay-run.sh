#!/bin/bash
# RSS during snapshot builds: jemalloc's default page decay against none (dirty pages returned at once).
cd /work/main
for v in default nodecay; do
  env=""; [ $v = nodecay ] && env="_RJEM_MALLOC_CONF=dirty_decay_ms:0,muzzy_decay_ms:0"
  env $env TMPDIR=/work/soak-tmp /work/bin/load-new --habar-bin /work/bin/habar-final --spawn 3 --quiet --node-arg=--shards=4 \
    --node-arg=--snapshot-logs-since-last=2000 --node-arg=--snapshot-growth-percent=0 \
    --scenario loadtest/scenarios/one-to-one.toml --duration 180s > /work/perf/decay/$v.txt 2>&1
  rm -rf /work/soak-tmp/habar-load-*
done
