package cache

import (
	"testing"
	"time"
)

// slowClose is a source whose Close takes a while (an iSCSI logout).
type slowClose struct {
	*src
	entered chan struct{}
	release chan struct{}
}

func (s *slowClose) Close() error {
	close(s.entered)
	<-s.release
	return nil
}

// An export that is stopped and started again at once reopens its base
// while the last reference's close is still running: the open must wait
// for that close, not fail as if another process held the cache.
func TestReopenWhileClosing(t *testing.T) {
	m := mustManager(t, t.TempDir(), 0)
	s := &slowClose{src: newSrc(1<<20, 1), entered: make(chan struct{}), release: make(chan struct{})}
	r, err := m.Open("b", testBind, s, 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	readAll(t, r)
	closed := make(chan error)
	go func() { closed <- r.Close() }()
	<-s.entered
	go func() {
		time.Sleep(50 * time.Millisecond)
		close(s.release)
	}()
	r2, err := m.Open("b", testBind, newSrc(1<<20, 1), 0)
	if err != nil {
		t.Fatalf("reopen during close: %v", err)
	}
	defer r2.Close()
	if err := <-closed; err != nil {
		t.Fatal(err)
	}
	if st := r2.Stats(); st.ChunksPresent != st.Chunks {
		t.Fatalf("reopened cache lost its chunks: %+v", st)
	}
}
