package pbitmap

import (
	"errors"
	"math"
	"os"
	"path/filepath"
	"testing"
)

// Size+UnitSize-1 must not overflow: Units would go negative and a file
// of just the header would pass the length check.
func TestUnitsOverflow(t *testing.T) {
	p := filepath.Join(t.TempDir(), "bm")
	os.WriteFile(p, encodeHeader(Header{Kind: "cow", Size: 2, UnitSize: math.MaxInt64}), 0o600)
	b, err := Open(p, func() error { return nil })
	if err == nil {
		n := b.Len()
		b.Close()
		t.Fatalf("opened with %d units", n)
	}
	if !errors.Is(err, ErrFormat) {
		t.Fatalf("overflowing header: %v", err)
	}
	if err := Create(p, Header{Kind: "cow", Size: 2, UnitSize: math.MaxInt64}); !errors.Is(err, ErrFormat) {
		t.Fatalf("create with an overflowing header: %v", err)
	}
}
