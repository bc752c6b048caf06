package e2e

import (
	"io"
	"sync/atomic"
	"time"
)

// DelayCopy copies src to dst, each piece delay after it was read (a
// delay line: the rate stays the link's, only the latency grows; this
// kernel has no sch_netem), and counts the bytes written in n.
func DelayCopy(dst io.Writer, src io.Reader, delay time.Duration, n *atomic.Int64) {
	type piece struct {
		at time.Time
		b  []byte
	}
	q := make(chan piece, 4096)
	go func() {
		defer close(q)
		for {
			buf := make([]byte, 64<<10)
			k, err := src.Read(buf)
			if k > 0 {
				q <- piece{time.Now().Add(delay), buf[:k]}
			}
			if err != nil {
				return
			}
		}
	}()
	for p := range q {
		time.Sleep(time.Until(p.at))
		if _, err := dst.Write(p.b); err != nil {
			for range q {
			}
			return
		}
		n.Add(int64(len(p.b)))
	}
}
