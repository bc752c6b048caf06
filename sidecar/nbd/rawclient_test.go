package nbd

import (
	"encoding/binary"
	"io"
	"net"
	"testing"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"github.com/vmthunder/vmthunder/sidecar/blockdev/memdev"
)

// rawClient speaks just enough NBD (EXPORT_NAME, simple replies) to send
// requests that well-behaved clients never send.
type rawClient struct{ c net.Conn }

func dialRaw(t *testing.T, sock, name string) *rawClient {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	hello := make([]byte, 18)
	if _, err := io.ReadFull(c, hello); err != nil {
		t.Fatal(err)
	}
	b := binary.BigEndian.AppendUint32(nil, handshakeFixed|handshakeNoZeros)
	b = binary.BigEndian.AppendUint64(b, magicOpt)
	b = binary.BigEndian.AppendUint32(b, optExportName)
	b = binary.BigEndian.AppendUint32(b, uint32(len(name)))
	b = append(b, name...)
	c.Write(b)
	info := make([]byte, 10)
	if _, err := io.ReadFull(c, info); err != nil {
		t.Fatalf("export %q: %v", name, err)
	}
	return &rawClient{c}
}

func (r *rawClient) send(typ uint16, cookie, off uint64, length uint32, payload []byte) {
	b := binary.BigEndian.AppendUint32(nil, magicRequest)
	b = binary.BigEndian.AppendUint16(b, 0)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	b = binary.BigEndian.AppendUint64(b, off)
	b = binary.BigEndian.AppendUint32(b, length)
	r.c.Write(append(b, payload...))
}

// reply reads a simple reply and, if ok and dataLen > 0, its data.
func (r *rawClient) reply(t *testing.T, dataLen int) (errno uint32, cookie uint64, data []byte) {
	t.Helper()
	h := make([]byte, 16)
	if _, err := io.ReadFull(r.c, h); err != nil {
		t.Fatal(err)
	}
	if binary.BigEndian.Uint32(h) != magicSimple {
		t.Fatalf("bad reply magic %x", h[:4])
	}
	errno, cookie = binary.BigEndian.Uint32(h[4:]), binary.BigEndian.Uint64(h[8:])
	if errno == 0 && dataLen > 0 {
		data = make([]byte, dataLen)
		io.ReadFull(r.c, data)
	}
	return
}

func TestBadRequestsGetErrorsAndStreamStaysInStep(t *testing.T) {
	dev := memdev.New(1 << 20)
	copy(dev.Bytes(), "hello")
	sock := serveDevs(t, map[string]blockdev.Device{"": dev, "ro": memdev.FromBytes(make([]byte, 4096), true)})
	c := dialRaw(t, sock, "")
	cases := []struct {
		typ     uint16
		off     uint64
		length  uint32
		payload []byte
		want    uint32
	}{
		{cmdRead, 1 << 20, 4096, nil, errInval},                 // past the end
		{cmdWrite, 1<<20 - 2, 4, []byte("abcd"), errNoSpc},      // write past the end
		{cmdWrite, 0, 64 << 20, make([]byte, 64<<20), errInval}, // over max block: drained
		{99, 0, 0, nil, errInval},                               // unknown command
		{cmdBlockStatus, 0, 4096, nil, errInval},                // not negotiated
	}
	for i, tc := range cases {
		c.send(tc.typ, uint64(i+1), tc.off, tc.length, tc.payload)
		errno, cookie, _ := c.reply(t, 0)
		if errno != tc.want || cookie != uint64(i+1) {
			t.Errorf("case %d: errno %d cookie %d, want errno %d cookie %d", i, errno, cookie, tc.want, i+1)
		}
	}
	// The stream is still in step: a good read works.
	c.send(cmdRead, 77, 0, 5, nil)
	if errno, cookie, data := c.reply(t, 5); errno != 0 || cookie != 77 || string(data) != "hello" {
		t.Fatalf("read after bad requests: errno %d cookie %d data %q", errno, cookie, data)
	}
	ro := dialRaw(t, sock, "ro")
	ro.send(cmdWrite, 5, 0, 4, []byte("abcd"))
	if errno, _, _ := ro.reply(t, 0); errno != errPerm {
		t.Fatalf("write to read-only export: errno %d, want EPERM", errno)
	}
	ro.send(cmdTrim, 6, 0, 4096, nil)
	if errno, _, _ := ro.reply(t, 0); errno != errPerm {
		t.Fatalf("trim on read-only export: errno %d, want EPERM", errno)
	}
}
