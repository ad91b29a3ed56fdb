#!/bin/bash
# cluster.sh start|stop: a 3-node NATS JetStream cluster on loopback
base=/work/soak-tmp/nats
if [ "$1" = stop ]; then pkill -f "nats-server -c $base" ; sleep 1; rm -rf $base; exit 0; fi
rm -rf $base; mkdir -p $base
for i in 1 2 3; do
  routes=""
  for j in 1 2 3; do [ $j != $i ] && routes="$routes
    nats-route://127.0.0.1:622$j"; done
  cat > $base/n$i.conf <<C
server_name: n$i
listen: 127.0.0.1:422$i
jetstream { store_dir: "$base/n$i", max_mem_store: 1G, max_file_store: 20G }
cluster { name: c1, listen: 127.0.0.1:622$i, routes: [$routes
  ] }
C
  nohup nats-server -c $base/n$i.conf > $base/n$i.log 2>&1 &
done
sleep 4
