#!/bin/bash
# evstat.sh BIN OUT <habar-load flags>: system-wide event counts over 8 s in the middle of a 25 s run.
BIN=$1; OUT=$2; shift 2
cd /work/main
(TMPDIR=/work/soak-tmp /work/bin/load-new --habar-bin $BIN --spawn 3 --quiet --node-arg=--shards=4 --duration 25s "$@" > $OUT.txt 2>&1 &)
sleep 12
perf stat -a -e 'syscalls:sys_enter_fdatasync,syscalls:sys_enter_fsync,sched:sched_switch,syscalls:sys_enter_futex,syscalls:sys_enter_sendmsg,syscalls:sys_enter_sendto,syscalls:sys_enter_write,syscalls:sys_enter_pwrite64,syscalls:sys_enter_recvfrom,syscalls:sys_enter_epoll_wait,irq:irq_handler_entry,instructions,cycles' -- sleep 8 > $OUT.stat 2>&1
sleep 8; rm -rf /work/soak-tmp/habar-load-*
grep -E "publish |batching|µs per" $OUT.txt; grep -E "[0-9]" $OUT.stat | grep -v "^ *$" | head -20
