package nbd

import (
	"container/list"
	"sync"
	"sync/atomic"
)

// Memory held for requests (WRITE payloads read from the client, READ
// buffers until their reply is sent) is bounded per export and per server.
// Without a bound, one client pipelining 64 writes of 32 MiB to a slow
// export held 2 GiB, and every connection could do the same.
//
// A request is charged the size of the buffer it gets (its length rounded
// up to the buffer pool's size class), before the buffer is allocated and
// until its reply is written. A request larger than a budget is charged
// the whole budget: it runs alone rather than never.
const (
	// DefaultExportMemory bounds the request buffers of one export, over
	// all its connections: two maximum-size (32 MiB) requests, or 16384
	// of 4 KiB.
	DefaultExportMemory = 64 << 20
	// DefaultServerMemory bounds the request buffers of a whole Server:
	// four exports busy at their bound.
	DefaultServerMemory = 256 << 20
)

// MemoryBudget is a number of bytes that requests take from and give back,
// waiting in turn when it is used up. One budget may be shared by several
// Servers (WithMemoryBudget) to bound them together.
type MemoryBudget struct {
	size int64

	mu      sync.Mutex
	used    int64
	waiters list.List // of *budgetWaiter, first come first served

	peak atomic.Int64 // most ever used; for tests
}

type budgetWaiter struct {
	n     int64
	ready chan struct{} // closed once the bytes are taken for the waiter
}

// NewMemoryBudget returns a budget of size bytes (at least 1).
func NewMemoryBudget(size int64) *MemoryBudget {
	return &MemoryBudget{size: max(size, 1)}
}

// Size is the budget's bound in bytes.
func (b *MemoryBudget) Size() int64 { return b.size }

// InUse is how many bytes requests hold now.
func (b *MemoryBudget) InUse() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.used
}

// charge is what a request of n bytes takes: n, or the whole budget when n
// is larger, so that it still runs (alone).
func (b *MemoryBudget) charge(n int64) int64 { return min(n, b.size) }

// tryAcquire takes n bytes if they are free and nobody waits before us.
func (b *MemoryBudget) tryAcquire(n int64) bool {
	n = b.charge(n)
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.waiters.Len() == 0 && b.used+n <= b.size {
		b.take(n)
		return true
	}
	return false
}

// acquire takes n bytes, waiting behind earlier waiters until they are
// free. It gives up, returning false, once stop is closed.
func (b *MemoryBudget) acquire(n int64, stop <-chan struct{}) bool {
	n = b.charge(n)
	b.mu.Lock()
	if b.waiters.Len() == 0 && b.used+n <= b.size {
		b.take(n)
		b.mu.Unlock()
		return true
	}
	w := &budgetWaiter{n: n, ready: make(chan struct{})}
	elem := b.waiters.PushBack(w)
	b.mu.Unlock()
	select {
	case <-w.ready:
		return true
	case <-stop:
	}
	b.mu.Lock()
	select {
	case <-w.ready:
		// Granted meanwhile: give it back.
		b.used -= n
	default:
		b.waiters.Remove(elem)
	}
	// Either way those behind us may fit now.
	b.grant()
	b.mu.Unlock()
	return false
}

// release gives back what acquire(n) took.
func (b *MemoryBudget) release(n int64) {
	if n <= 0 {
		return
	}
	n = b.charge(n)
	b.mu.Lock()
	b.used -= n
	if b.used < 0 {
		panic("nbd: memory budget released more than was acquired")
	}
	b.grant()
	b.mu.Unlock()
}

// grant hands free bytes to waiters in order; b.mu is held.
func (b *MemoryBudget) grant() {
	for e := b.waiters.Front(); e != nil; e = b.waiters.Front() {
		w := e.Value.(*budgetWaiter)
		if b.used+w.n > b.size {
			return
		}
		b.take(w.n)
		b.waiters.Remove(e)
		close(w.ready)
	}
}

// take adds n to used; b.mu is held.
func (b *MemoryBudget) take(n int64) {
	b.used += n
	if b.used > b.peak.Load() {
		b.peak.Store(b.used)
	}
}

// memCounter counts bytes of request buffers actually allocated and not
// yet given back, and the most ever: what the tests hold the budgets to.
type memCounter struct{ cur, peak atomic.Int64 }

func (m *memCounter) add(n int64) {
	v := m.cur.Add(n)
	for {
		p := m.peak.Load()
		if v <= p || m.peak.CompareAndSwap(p, v) {
			return
		}
	}
}
