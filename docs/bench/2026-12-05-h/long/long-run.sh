#!/bin/bash
# long.sh: 600 s one-to-one, default snapshot settings, base (7e1e947) then the final build; RSS every 15 s; build log lines kept.
cd /work/main
OUT=/work/perf/long; mkdir -p $OUT
for tag in base dt2; do
  rm -rf /work/soak-tmp/*
  TMPDIR=/work/soak-tmp /work/bin/load-new --habar-bin /work/bin/habar-$tag --spawn 3 --quiet --node-arg=--shards=4 --keep-data \
    --scenario loadtest/scenarios/one-to-one.toml --duration 600s --json $OUT/$tag.json --plot $OUT/$tag.svg > $OUT/$tag.txt 2>&1 &
  LP=$!
  sleep 20
  while kill -0 $LP 2>/dev/null; do
    echo "$(date +%s) $(for p in $(pgrep -f "habar-$tag serve"); do grep VmRSS /proc/$p/status | awk '{print $2}'; done | tr '\n' ' ')" >> $OUT/$tag-rss.txt
    sleep 15
  done
  d=$(ls -d /work/soak-tmp/habar-load-* | head -1)
  grep -h 'snapshot built' $d/n*.log > $OUT/$tag-builds.txt
  du -sh $d > $OUT/$tag-du.txt
  rm -rf /work/soak-tmp/*
  echo "== $tag"; grep -iE "^ *publish|rss" $OUT/$tag.txt | head -3
done
