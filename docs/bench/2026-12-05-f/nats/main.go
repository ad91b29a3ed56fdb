// Closed-loop JetStream R3 publisher, driven like habar-load's one-to-one scenario:
// P publishers x W in flight, 256-byte payloads, C subjects (conversations) uniform.
package main

import (
	"flag"
	"fmt"
	"math/rand"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
)

type pending struct {
	f  nats.PubAckFuture
	t0 time.Time
}

func main() {
	urls := flag.String("urls", "nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224", "servers")
	pubs := flag.Int("publishers", 32, "publishers")
	inflight := flag.Int("in-flight", 16, "in flight per publisher")
	convs := flag.Int("conversations", 1000, "subjects")
	size := flag.Int("size", 256, "payload bytes")
	dur := flag.Duration("duration", 30*time.Second, "measured duration")
	warm := flag.Duration("warmup", 5*time.Second, "warm-up")
	msgid := flag.Bool("msgid", true, "set Nats-Msg-Id (dedupe, like habar's message ids)")
	rate := flag.Float64("rate", 0, "open loop: total msgs/s (0 = closed loop)")
	flag.Parse()
	servers := strings.Split(*urls, ",")

	nc, err := nats.Connect(*urls)
	if err != nil {
		panic(err)
	}
	js, _ := nc.JetStream()
	_ = js.DeleteStream("LOAD")
	if _, err := js.AddStream(&nats.StreamConfig{Name: "LOAD", Subjects: []string{"load.>"}, Replicas: 3, Storage: nats.FileStorage}); err != nil {
		panic(err)
	}
	time.Sleep(2 * time.Second)

	var acked, errs int64
	start := time.Now()
	measureFrom := start.Add(*warm)
	end := measureFrom.Add(*dur)
	lats := make([][]time.Duration, *pubs)
	var wg sync.WaitGroup
	for p := 0; p < *pubs; p++ {
		wg.Add(1)
		go func(p int) {
			defer wg.Done()
			c, err := nats.Connect(servers[p%len(servers)])
			if err != nil {
				panic(err)
			}
			defer c.Close()
			j, _ := c.JetStream(nats.PublishAsyncMaxPending(*inflight * 2))
			q := make(chan pending, *inflight)
			done := make(chan struct{})
			go func() {
				for pe := range q {
					select {
					case <-pe.f.Ok():
						if pe.t0.After(measureFrom) && pe.t0.Before(end) {
							atomic.AddInt64(&acked, 1)
							lats[p] = append(lats[p], time.Since(pe.t0))
						}
					case <-pe.f.Err():
						atomic.AddInt64(&errs, 1)
					}
				}
				close(done)
			}()
			r := rand.New(rand.NewSource(int64(p)))
			payload := make([]byte, *size)
			var interval time.Duration
			next := time.Now()
			if *rate > 0 {
				interval = time.Duration(float64(time.Second) * float64(*pubs) / *rate)
			}
			for n := 0; time.Now().Before(end); n++ {
				t0 := time.Now()
				if interval > 0 {
					next = next.Add(interval)
					if d := time.Until(next); d > 0 {
						time.Sleep(d)
					}
					t0 = next // intended send time
				}
				subj := fmt.Sprintf("load.%d", r.Intn(*convs))
				var opts []nats.PubOpt
				if *msgid {
					opts = append(opts, nats.MsgId(fmt.Sprintf("%d-%d", p, n)))
				}
				f, err := j.PublishAsync(subj, payload, opts...)
				if err != nil {
					atomic.AddInt64(&errs, 1)
					continue
				}
				q <- pending{f, t0}
			}
			close(q)
			<-done
		}(p)
	}
	wg.Wait()
	var all []time.Duration
	for _, l := range lats {
		all = append(all, l...)
	}
	sort.Slice(all, func(a, b int) bool { return all[a] < all[b] })
	pct := func(q float64) float64 {
		if len(all) == 0 {
			return 0
		}
		return float64(all[int(q*float64(len(all)-1))].Microseconds()) / 1000
	}
	fmt.Printf("acked %d in %.1f s = %.0f msgs/s; errors %d; p50 %.2f p90 %.2f p99 %.2f p99.9 %.2f max %.2f ms\n",
		acked, dur.Seconds(), float64(acked)/dur.Seconds(), errs, pct(0.5), pct(0.9), pct(0.99), pct(0.999), pct(1))
}
