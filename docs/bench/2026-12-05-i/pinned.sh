#!/bin/bash
# pinned.sh BIN LOADER OUT MAP <habar-load flags>: a --spawn 3 run whose processes are pinned 3 s in
# (all threads, taskset -a): MAP = "n1 n2 n3 tester" CPUs, e.g. "0 1 0 1".
BIN=$1; LD=$2; OUT=$3; MAP=($4); shift 4
cd /work/main
TMPDIR=/work/soak-tmp $LD --habar-bin $BIN --spawn 3 --quiet --node-arg=--shards=4 "$@" > $OUT 2>&1 &
sleep 3
for i in 1 2 3; do P=$(pgrep -f "$(basename $BIN) serve --id $i " | head -1); taskset -a -p -c ${MAP[$((i-1))]} $P > /dev/null; done
P=$(pgrep -f "$(basename $LD) --habar-bin" | head -1); taskset -a -p -c ${MAP[3]} $P > /dev/null
wait
rm -rf /work/soak-tmp/habar-load-*
grep -E "publish |batching|µs per" $OUT
