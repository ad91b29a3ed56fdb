#!/bin/bash
# prof1.sh BIN OUTPREFIX: 25 s one-to-one closed loop; dwarf profile of node 1 for 5 s at second 14; folded stacks.
BIN=$1; OUT=$2
cd /work/main
(TMPDIR=/work/soak-tmp /work/bin/load-new --habar-bin $BIN --spawn 3 --quiet --node-arg=--shards=4 --scenario loadtest/scenarios/one-to-one.toml --duration 25s > $OUT.txt 2>&1 &)
sleep 14
P=$(pgrep -f "$(basename $BIN) serve --id 1 " | head -1)
perf record -F 1999 --call-graph dwarf,16384 -p $P -o $OUT.data -- sleep 5 > /dev/null 2>&1
sleep 13
rm -rf /work/soak-tmp/habar-load-*
perf script -i $OUT.data --no-inline 2>/dev/null > $OUT.script
python3 /work/prof/fold.py $OUT.script $OUT.folded
rm -f $OUT.script
grep -E "publish |µs per" $OUT.txt
