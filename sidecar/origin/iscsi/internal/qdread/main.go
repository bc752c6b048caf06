// Command qdread reads an iscsi:// origin through package iscsi at a given
// queue depth and prints the throughput: the origin half of
// tests/bench/bench-iscsi.sh.
package main

import (
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vmthunder/vmthunder/sidecar/origin/iscsi"
)

func main() {
	qd := flag.Int("qd", 32, "requests in flight")
	bs := flag.Int("bs", 1<<20, "request size in bytes")
	random := flag.Bool("random", false, "random offsets (else sequential)")
	dur := flag.Duration("time", 10*time.Second, "run time (sequential stops at the end of the LUN)")
	sessions := flag.Int("sessions", 0, "iSCSI sessions (0: default)")
	flag.Parse()
	s, err := iscsi.ParseURL(flag.Arg(0))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	s.ReadOnly = true
	s.Sessions = *sessions
	d, err := iscsi.Open(s)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer d.Close()
	blocks := d.Size() / int64(*bs)
	var next, total atomic.Int64
	stop := time.Now().Add(*dur)
	start := time.Now()
	var wg sync.WaitGroup
	var failed atomic.Value
	for w := 0; w < *qd; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			buf := make([]byte, *bs)
			rng := rand.New(rand.NewPCG(uint64(w), 7))
			for time.Now().Before(stop) {
				var b int64
				if *random {
					b = rng.Int64N(blocks)
				} else if b = next.Add(1) - 1; b >= blocks {
					return
				}
				if _, err := d.ReadAt(buf, b*int64(*bs)); err != nil {
					failed.Store(err)
					return
				}
				total.Add(int64(*bs))
			}
		}(w)
	}
	wg.Wait()
	if err, _ := failed.Load().(error); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	el := time.Since(start).Seconds()
	fmt.Printf("%.1f MiB/s %.0f IOPS\n", float64(total.Load())/el/(1<<20), float64(total.Load())/float64(*bs)/el)
}
