#!/bin/bash
# run.sh OUT <natsload flags>: a fresh 3-node JetStream cluster (../../2026-12-05-f/nats/cluster.sh),
# the Go driver built from ../../2026-12-05-f/nats/main.go (GO111MODULE=off GOPATH=/usr/share/gocode
# go build, Debian's nats-server and golang-github-nats-io-go-nats-dev), the servers' CPU over the
# whole run and their peak RSS.
OUT=$1; shift
C=/work/main/docs/bench/2026-12-05-f/nats/cluster.sh
bash $C start
pids=$(pgrep -f "nats-server -c /work/soak-tmp/nats")
tick=$(getconf CLK_TCK)
cpu() { t=0; for p in $pids; do s=($(cut -d' ' -f14,15 /proc/$p/stat)); t=$((t + s[0] + s[1])); done; echo $t; }
c0=$(cpu); t0=$(date +%s.%N)
/work/bin/natsload -urls nats://127.0.0.1:4221,nats://127.0.0.1:4222,nats://127.0.0.1:4223 "$@" > $OUT 2>&1
c1=$(cpu); t1=$(date +%s.%N)
echo "nats-server CPU: $(echo "($c1 - $c0) / $tick / ($t1 - $t0)" | bc -l | cut -c1-5) cores (3 servers, whole run incl. warm-up); peak RSS: $(for p in $pids; do grep VmHWM /proc/$p/status | awk '{printf "%d MiB ", $2/1024}'; done)" >> $OUT
bash $C stop
cat $OUT
