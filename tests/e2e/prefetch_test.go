package e2e

import (
	"context"
	"testing"
	"time"
)

// A real guest's first boot through the daemon records a boot trace of its
// template base; on a fresh cache holding only that trace, the next boot's
// working set is fetched ahead of the guest (replayed), and the guest then
// reads what was fetched.
func TestBootTraceRecordReplay(t *testing.T) {
	e := newEnv(t)
	d := DaemonOf(e.node)
	if d == nil {
		t.Skip("boot traces need the daemon (not the export stand-in)")
	}
	c, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	rec, err := e.node.Export("rec", "cow")
	if err != nil {
		t.Fatal(err)
	}
	_, coldSent := e.boot(rec, "rec", nil)
	tr, err := d.api.Trace(c, rec.Base)
	if err != nil || !tr.Recording {
		t.Fatalf("during the first boot's window: trace %+v, %v; want a recording", tr, err)
	}
	// The last export of the base going ends the recording.
	if err := e.node.Remove("rec"); err != nil {
		t.Fatal(err)
	}
	if tr, err = d.api.Trace(c, rec.Base); err != nil || !tr.Present || tr.Recording {
		t.Fatalf("after the first boot: trace %+v, %v", tr, err)
	}
	t.Logf("recorded %d chunks, %d bytes over %d ms; the guest read %d bytes, the target sent %d", tr.Chunks, tr.Bytes, tr.DurationMS, image.BootReadBytes, coldSent)
	if tr.Bytes < image.BootReadBytes/2 || tr.Bytes > coldSent+tr.ChunkSize {
		t.Fatalf("the trace covers %d bytes: the boot read %d, the target sent %d", tr.Bytes, image.BootReadBytes, coldSent)
	}
	raw, err := d.api.ExportTrace(c, rec.Base)
	if err != nil {
		t.Fatal(err)
	}

	// A fresh cache: the base and its trace removed, the trace imported.
	if err := d.api.DeleteBase(c, rec.Base); err != nil {
		t.Fatal(err)
	}
	if _, err := d.api.Trace(c, rec.Base); err == nil {
		t.Fatal("the trace outlived its base's cache")
	}
	if _, err := d.api.ImportTrace(c, rec.Base, raw); err != nil {
		t.Fatal(err)
	}
	rep, err := e.node.Export("rep", "cow")
	if err != nil {
		t.Fatal(err)
	}
	e.boot(rep, "rep", nil)
	tr, err = d.api.Trace(c, rec.Base)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("replay: %+v", tr)
	if tr.Recording || tr.BackedOff {
		t.Fatalf("the replayed boot recorded or backed off: %+v", tr)
	}
	// The guest is slower than a loopback target: the replay runs ahead
	// and fetches most of the trace before the guest asks.
	if tr.PrefetchedChunks*2 < uint64(tr.Chunks) {
		t.Fatalf("the replay fetched %d of the trace's %d chunks", tr.PrefetchedChunks, tr.Chunks)
	}
	if tr.HitChunks*10 < tr.PrefetchedChunks*9 {
		t.Fatalf("the guest read %d of %d prefetched chunks: the replay fetched what the boot did not need", tr.HitChunks, tr.PrefetchedChunks)
	}
	if err := e.node.Remove("rep"); err != nil {
		t.Fatal(err)
	}
	if tr, err = d.api.Trace(c, rec.Base); err != nil || tr.WastedBytes*10 > tr.PrefetchedBytes {
		t.Fatalf("after the replayed boot: %+v, %v: more than a tenth wasted", tr, err)
	}
}
