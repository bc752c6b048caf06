package prefetch

import (
	"encoding/binary"
	"errors"
	"hash/crc32"
	"runtime"
	"testing"
)

// A trace file is API input (PUT .../trace/data): a few bytes claiming a
// million entries must not make the daemon allocate for a million.
func TestDecodeClaimedCountAllocatesLittle(t *testing.T) {
	raw := []byte(magic)
	raw = binary.AppendUvarint(raw, 4096)
	raw = binary.AppendUvarint(raw, 1<<40)
	raw = binary.AppendUvarint(raw, MaxEntries)
	raw = binary.LittleEndian.AppendUint32(raw, crc32.ChecksumIEEE(raw))
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for i := 0; i < 8; i++ {
		if _, err := Decode(raw); !errors.Is(err, ErrFormat) {
			t.Fatalf("decode of a trace claiming %d entries in %d bytes: %v", MaxEntries, len(raw), err)
		}
	}
	runtime.ReadMemStats(&after)
	if n := after.TotalAlloc - before.TotalAlloc; n > 1<<20 {
		t.Errorf("8 decodes of a %d-byte trace allocated %d bytes", len(raw), n)
	}
}

// A trace of large chunks replayed on a cache of small ones is bounded like
// a recorded one (MaxEntries), not by the base's size: a few hundred
// entries of 64 MiB must not become millions of 4 KiB chunks in memory.
func TestRechunkBounded(t *testing.T) {
	tr := &Trace{ChunkSize: 64 << 20, Size: 8 << 30}
	for c := int64(0); c < 128; c++ {
		tr.Chunks, tr.MS = append(tr.Chunks, c), append(tr.MS, uint32(c))
	}
	if _, err := Decode(must(tr.Encode())); err != nil {
		t.Fatal(err)
	}
	chunks, ms := tr.Rechunk(4096)
	if len(chunks) > MaxEntries || len(ms) != len(chunks) {
		t.Fatalf("rechunked to %d entries (%d times), the bound is %d", len(chunks), len(ms), MaxEntries)
	}
	if len(chunks) == 0 || chunks[0] != 0 || chunks[len(chunks)-1] != int64(len(chunks)-1) {
		t.Fatalf("rechunk keeps the trace's order from its start: %d entries", len(chunks))
	}
}

func must(b []byte, err error) []byte {
	if err != nil {
		panic(err)
	}
	return b
}
