package peers

import (
	"context"

	"golang.org/x/time/rate"
)

// NewLimiter is a byte-rate limiter of bytesPerSec ([peers] origin_rate
// and serve_rate); nil (unlimited) for 0. Its burst is a tenth of a
// second's bytes, at least 64 KiB and at most 4 MiB: a larger wait is
// taken in pieces (WaitBytes).
func NewLimiter(bytesPerSec int64) *rate.Limiter {
	if bytesPerSec <= 0 {
		return nil
	}
	burst := min(max(bytesPerSec/10, 64<<10), 4<<20)
	return rate.NewLimiter(rate.Limit(bytesPerSec), int(burst))
}

// WaitBytes waits until l allows n bytes (nil l: at once).
func WaitBytes(ctx context.Context, l *rate.Limiter, n int) error {
	if l == nil {
		return nil
	}
	for n > 0 {
		k := min(n, l.Burst())
		if err := l.WaitN(ctx, k); err != nil {
			return err
		}
		n -= k
	}
	return nil
}
