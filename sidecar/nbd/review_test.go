package nbd

import (
	"encoding/binary"
	"sync"
	"testing"
	"time"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"github.com/vmthunder/vmthunder/sidecar/blockdev/memdev"
)

// goStructured negotiates structured replies, runs the given extra options
// and enters transmission on name with NBD_OPT_GO.
func goStructured(t *testing.T, r *rawClient, name string) {
	t.Helper()
	r.option(optStructuredReply, nil)
	if typ, _ := r.optReply(optStructuredReply); typ != repAck {
		t.Fatalf("STRUCTURED_REPLY: reply %#x", typ)
	}
	r.option(optGo, nameQuery(name, []byte{0, 0}))
	for {
		typ, data := r.optReply(optGo)
		if typ == repAck {
			return
		}
		if typ != repInfo {
			t.Fatalf("GO reply %#x %q", typ, data)
		}
	}
}

func setMeta(t *testing.T, r *rawClient, export string) (selected bool, errTyp uint32) {
	t.Helper()
	r.option(optSetMetaContext, nameQuery(export, append(binary.BigEndian.AppendUint32(nil, 1), nameQuery(baseAllocation, nil)...)))
	for {
		typ, _ := r.optReply(optSetMetaContext)
		switch {
		case typ == repMetaContext:
			selected = true
		case typ == repAck:
			return selected, 0
		case typ&repErrBit != 0:
			return false, typ
		}
	}
}

// A structured OFFSET_DATA chunk must carry at least one byte of data
// (length >= 9): QEMU drops the connection on a shorter one.
func TestZeroLengthStructuredReadIsAValidChunk(t *testing.T) {
	dev := memdev.New(1 << 20)
	copy(dev.Bytes(), "data")
	sock := serveDevs(t, map[string]blockdev.Device{"": dev})
	r := dialHandshake(t, sock)
	goStructured(t, r, "")
	r.send(cmdRead, 0, 1, 0, 0, nil)
	flags, typ, cookie, p := r.chunk()
	if cookie != 1 || flags&replyFlagDone == 0 {
		t.Fatalf("zero-length read: flags %d type %d cookie %d", flags, typ, cookie)
	}
	if typ == replyTypeOffsetData && len(p) < 9 {
		t.Fatalf("zero-length read answered with an OFFSET_DATA chunk of %d bytes; the protocol requires at least 9", len(p))
	}
	r.send(cmdRead, 0, 2, 0, 4, nil)
	if _, typ, cookie, p := r.chunk(); typ != replyTypeOffsetData || cookie != 2 || string(p[8:]) != "data" {
		t.Fatalf("read after: type %d cookie %d payload %q", typ, cookie, p)
	}
}

// A server that advertises NBD_FLAG_SEND_CACHE must reject command flags
// it does not recognise on NBD_CMD_CACHE.
func TestCacheRejectsUnknownFlags(t *testing.T) {
	sock := serveDevs(t, map[string]blockdev.Device{"": memdev.New(1 << 20)})
	c := dialRaw(t, sock, "")
	c.send(cmdCache, 1<<5, 1, 0, 4096, nil)
	if errno, cookie, _ := c.reply(0); errno != errInval || cookie != 1 {
		t.Fatalf("CACHE with an unknown flag: errno %d cookie %d, want EINVAL", errno, cookie)
	}
	c.send(cmdCache, 0, 2, 0, 4096, nil)
	if errno, cookie, _ := c.reply(0); errno != 0 || cookie != 2 {
		t.Fatalf("plain CACHE: errno %d cookie %d", errno, cookie)
	}
}

// SET_META_CONTEXT replaces the selection even when it fails, and a
// selection made for one export does not hold for another one entered
// with EXPORT_NAME.
func TestMetaContextSelectionDoesNotLeak(t *testing.T) {
	sock := serveDevs(t, map[string]blockdev.Device{"a": memdev.New(1 << 20), "b": memdev.New(1 << 20)})
	blockStatusRefused := func(r *rawClient) {
		t.Helper()
		r.send(cmdBlockStatus, 0, 7, 0, 4096, nil)
		_, typ, cookie, p := r.chunk()
		if typ != replyTypeError || cookie != 7 || binary.BigEndian.Uint32(p) != errInval {
			t.Fatalf("BLOCK_STATUS without a selected context: type %d cookie %d payload %x, want EINVAL", typ, cookie, p)
		}
	}

	r := dialHandshake(t, sock)
	r.option(optStructuredReply, nil)
	r.optReply(optStructuredReply)
	if ok, _ := setMeta(t, r, "a"); !ok {
		t.Fatal("base:allocation not selected")
	}
	if _, e := setMeta(t, r, "nope"); e != repErrUnknown {
		t.Fatalf("SET_META_CONTEXT on an unknown export: %#x", e)
	}
	r.option(optGo, nameQuery("a", []byte{0, 0}))
	for typ, _ := r.optReply(optGo); typ != repAck; typ, _ = r.optReply(optGo) {
	}
	blockStatusRefused(r)

	r = dialHandshake(t, sock)
	r.option(optStructuredReply, nil)
	r.optReply(optStructuredReply)
	if ok, _ := setMeta(t, r, "a"); !ok {
		t.Fatal("base:allocation not selected")
	}
	r.option(optExportName, []byte("b"))
	if _, err := r.c.Read(make([]byte, 10)); err != nil {
		t.Fatal(err)
	}
	blockStatusRefused(r)
}

// The asynchronous path's reads wait for Unplug: the reader must unplug
// before it waits for the payload of an oversized WRITE it is discarding.
func TestOversizedWriteDrainUnplugs(t *testing.T) {
	dev := &asyncDev{Dev: memdev.New(1 << 20), failAt: 1 << 62}
	copy(dev.Bytes(), "data")
	sock := serveDevs(t, map[string]blockdev.Device{"": dev})
	c := dialRaw(t, sock, "")
	b := binary.BigEndian.AppendUint32(nil, magicRequest)
	b = binary.BigEndian.AppendUint16(b, 0)
	b = binary.BigEndian.AppendUint16(b, cmdRead)
	b = binary.BigEndian.AppendUint64(b, 1)
	b = binary.BigEndian.AppendUint64(b, 0)
	b = binary.BigEndian.AppendUint32(b, 4)
	b = binary.BigEndian.AppendUint32(b, magicRequest)
	b = binary.BigEndian.AppendUint16(b, 0)
	b = binary.BigEndian.AppendUint16(b, cmdWrite)
	b = binary.BigEndian.AppendUint64(b, 2)
	b = binary.BigEndian.AppendUint64(b, 0)
	b = binary.BigEndian.AppendUint32(b, defaultMaxBlock+1)
	// One write: the READ and the start of the oversized WRITE arrive
	// together; the rest of the payload is still on its way.
	c.c.Write(append(b, make([]byte, 512)...))
	c.c.SetReadDeadline(time.Now().Add(3 * time.Second))
	if errno, cookie, data := c.reply(4); errno != 0 || cookie != 1 || string(data) != "data" {
		t.Fatalf("read: errno %d cookie %d data %q", errno, cookie, data)
	}
}

// serialAsyncDev completes its asynchronous reads one after the other on
// a single goroutine, as an origin with one receive loop does; a done that
// blocks stalls every read of the device.
type serialAsyncDev struct {
	*memdev.Dev
	mu   sync.Mutex
	held []func()
	q    chan func()
}

func newSerialAsyncDev(size int64) *serialAsyncDev {
	d := &serialAsyncDev{Dev: memdev.New(size), q: make(chan func(), 1<<16)}
	go func() {
		for f := range d.q {
			f()
		}
	}()
	return d
}

func (d *serialAsyncDev) ReadAtAsync(p []byte, off int64, done func(error)) {
	d.mu.Lock()
	d.held = append(d.held, func() {
		_, err := d.Dev.ReadAt(p, off)
		done(err)
	})
	d.mu.Unlock()
}

func (d *serialAsyncDev) Unplug() {
	d.mu.Lock()
	held := d.held
	d.held = nil
	d.mu.Unlock()
	for _, f := range held {
		d.q <- f
	}
}

// A client that sends many reads and does not read the replies must not
// block the device's completion goroutine (done "must not block"), which
// would stall every other connection using the device.
func TestAsyncDoneDoesNotBlockOnASlowClient(t *testing.T) {
	dev := newSerialAsyncDev(16 << 20)
	copy(dev.Bytes(), "data")
	sock := serveDevs(t, map[string]blockdev.Device{"": dev})
	slow := dialRaw(t, sock, "")
	var b []byte
	for i := range 1000 {
		b = binary.BigEndian.AppendUint32(b, magicRequest)
		b = binary.BigEndian.AppendUint16(b, 0)
		b = binary.BigEndian.AppendUint16(b, cmdRead)
		b = binary.BigEndian.AppendUint64(b, uint64(i))
		b = binary.BigEndian.AppendUint64(b, uint64(i%256)<<16)
		b = binary.BigEndian.AppendUint32(b, 64<<10)
	}
	slow.c.Write(b)
	time.Sleep(500 * time.Millisecond) // let the slow connection's replies pile up
	other := dialRaw(t, sock, "")
	other.c.SetReadDeadline(time.Now().Add(3 * time.Second))
	other.send(cmdRead, 0, 1, 0, 4, nil)
	if errno, cookie, data := other.reply(4); errno != 0 || cookie != 1 || string(data) != "data" {
		t.Fatalf("read on another connection: errno %d cookie %d data %q", errno, cookie, data)
	}
}
