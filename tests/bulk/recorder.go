package bulk

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sort"
	"sync"
	"time"
)

// Recorder is an NBD proxy on a unix socket in front of an export: it
// passes everything through unchanged and notes, for every read the
// client (QEMU) sends, when it was issued and when its reply came back.
// Trace turns that into a replayable Trace.
type Recorder struct {
	Socket string
	target string
	ln     net.Listener

	mu    sync.Mutex
	start time.Time
	reads []recorded
	errs  []error
	wg    sync.WaitGroup
}

type recorded struct {
	off, len    int64
	issued, end time.Time
}

// NewRecorder listens on socket and forwards each connection to target.
func NewRecorder(socket, target string) (*Recorder, error) {
	ln, err := net.Listen("unix", socket)
	if err != nil {
		return nil, err
	}
	r := &Recorder{Socket: socket, target: target, ln: ln}
	go r.accept()
	return r, nil
}

func (r *Recorder) accept() {
	for {
		c, err := r.ln.Accept()
		if err != nil {
			return
		}
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			if err := r.proxy(c); err != nil {
				r.mu.Lock()
				r.errs = append(r.errs, err)
				r.mu.Unlock()
			}
		}()
	}
}

// Close stops listening and waits for the connections to end.
func (r *Recorder) Close() error {
	err := r.ln.Close()
	r.wg.Wait()
	return err
}

type inflight struct {
	off, len int64
	read     bool
	issued   time.Time
}

func (r *Recorder) proxy(client net.Conn) error {
	defer client.Close()
	server, err := net.Dial("unix", r.target)
	if err != nil {
		return err
	}
	defer server.Close()
	cr, sr := bufio.NewReader(client), bufio.NewReader(server)
	// The handshake is lock-step: copy it piece by piece until
	// transmission starts.
	copyN := func(dst io.Writer, src io.Reader, n int64) ([]byte, error) {
		b := make([]byte, n)
		if _, err := io.ReadFull(src, b); err != nil {
			return nil, err
		}
		_, err := dst.Write(b)
		return b, err
	}
	hello, err := copyN(client, sr, 18)
	if err != nil {
		return err
	}
	if binary.BigEndian.Uint64(hello) != nbdMagicInit {
		return errors.New("recorder: not an NBD server")
	}
	cflags, err := copyN(server, cr, 4)
	if err != nil {
		return err
	}
	noZeroes := binary.BigEndian.Uint32(cflags)&nbdFlagNoZeroes != 0
	for transmitting := false; !transmitting; {
		h, err := copyN(server, cr, 16)
		if err != nil {
			return err
		}
		opt, n := binary.BigEndian.Uint32(h[8:]), binary.BigEndian.Uint32(h[12:])
		if n > nbdMaxOptReply {
			return fmt.Errorf("recorder: option of %d bytes", n)
		}
		if _, err := copyN(server, cr, int64(n)); err != nil {
			return err
		}
		if opt == nbdOptExportName {
			k := int64(10)
			if !noZeroes {
				k += 124
			}
			if _, err := copyN(client, sr, k); err != nil {
				return err
			}
			break
		}
		for {
			rh, err := copyN(client, sr, 20)
			if err != nil {
				return err
			}
			typ, n := binary.BigEndian.Uint32(rh[12:]), binary.BigEndian.Uint32(rh[16:])
			if n > nbdMaxOptReply {
				return fmt.Errorf("recorder: option reply of %d bytes", n)
			}
			if _, err := copyN(client, sr, int64(n)); err != nil {
				return err
			}
			if typ == nbdRepAck || typ&nbdRepErrBit != 0 {
				transmitting = opt == nbdOptGo && typ == nbdRepAck
				break
			}
		}
	}
	r.mu.Lock()
	if r.start.IsZero() {
		r.start = time.Now()
	}
	r.mu.Unlock()

	var mu sync.Mutex
	pending := map[uint64]inflight{}
	errc := make(chan error, 2)
	// Client to server: requests (and write payloads).
	go func() {
		w := bufio.NewWriter(server)
		for {
			var h [28]byte
			if _, err := io.ReadFull(cr, h[:]); err != nil {
				errc <- err
				return
			}
			typ := binary.BigEndian.Uint16(h[6:])
			handle, off, n := binary.BigEndian.Uint64(h[8:]), int64(binary.BigEndian.Uint64(h[16:])), int64(binary.BigEndian.Uint32(h[24:]))
			mu.Lock()
			pending[handle] = inflight{off: off, len: n, read: typ == nbdCmdRead, issued: time.Now()}
			mu.Unlock()
			w.Write(h[:])
			if typ == nbdCmdWrite {
				if _, err := io.CopyN(w, cr, n); err != nil {
					errc <- err
					return
				}
			}
			if cr.Buffered() == 0 {
				if err := w.Flush(); err != nil {
					errc <- err
					return
				}
			}
			if typ == nbdCmdDisc {
				w.Flush()
				errc <- nil
				return
			}
		}
	}()
	// Server to client: replies, simple or structured.
	go func() {
		w := bufio.NewWriter(client)
		finish := func(handle uint64) {
			mu.Lock()
			f, ok := pending[handle]
			delete(pending, handle)
			mu.Unlock()
			if ok && f.read {
				r.mu.Lock()
				r.reads = append(r.reads, recorded{off: f.off, len: f.len, issued: f.issued, end: time.Now()})
				r.mu.Unlock()
			}
		}
		for {
			var magic [4]byte
			if _, err := io.ReadFull(sr, magic[:]); err != nil {
				errc <- err
				return
			}
			w.Write(magic[:])
			switch binary.BigEndian.Uint32(magic[:]) {
			case nbdMagicSimple:
				var h [12]byte
				if _, err := io.ReadFull(sr, h[:]); err != nil {
					errc <- err
					return
				}
				w.Write(h[:])
				code, handle := binary.BigEndian.Uint32(h[0:]), binary.BigEndian.Uint64(h[4:])
				mu.Lock()
				f := pending[handle]
				mu.Unlock()
				if code == 0 && f.read {
					if _, err := io.CopyN(w, sr, f.len); err != nil {
						errc <- err
						return
					}
				}
				finish(handle)
			case nbdMagicStructured:
				var h [16]byte
				if _, err := io.ReadFull(sr, h[:]); err != nil {
					errc <- err
					return
				}
				w.Write(h[:])
				flags, handle, n := binary.BigEndian.Uint16(h[0:]), binary.BigEndian.Uint64(h[4:]), int64(binary.BigEndian.Uint32(h[12:]))
				if _, err := io.CopyN(w, sr, n); err != nil {
					errc <- err
					return
				}
				if flags&nbdReplyFlagDone != 0 {
					finish(handle)
				}
			default:
				errc <- errors.New("recorder: bad reply magic")
				return
			}
			if sr.Buffered() == 0 {
				if err := w.Flush(); err != nil {
					errc <- err
					return
				}
			}
		}
	}()
	err = <-errc
	client.Close()
	server.Close()
	<-errc
	if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
		err = nil
	}
	return err
}

// Trace is what the recorder saw, as a replayable trace: each read waits
// for the one that completed last before it was issued, then for the
// time between the two.
func (r *Recorder) Trace(imageSize int64, imageSHA256, note string) (*Trace, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.reads) == 0 {
		return nil, fmt.Errorf("recorder saw no reads (errors: %v)", r.errs)
	}
	reads := append([]recorded(nil), r.reads...)
	sort.SliceStable(reads, func(i, j int) bool { return reads[i].issued.Before(reads[j].issued) })
	// Completions in time order, to find the last one before each issue.
	byEnd := make([]int, len(reads))
	for i := range byEnd {
		byEnd[i] = i
	}
	sort.SliceStable(byEnd, func(a, b int) bool { return reads[byEnd[a]].end.Before(reads[byEnd[b]].end) })
	t := &Trace{Version: 1, Note: note, ImageSize: imageSize, ImageSHA256: imageSHA256}
	k := -1 // byEnd[:k+1] completed before the current issue
	for i, rd := range reads {
		for k+1 < len(byEnd) && !reads[byEnd[k+1]].end.After(rd.issued) {
			k++
		}
		after, from := -1, r.start
		// The dependency must come earlier in the trace; a read that
		// completed before this one was issued was also issued before it.
		if k >= 0 && byEnd[k] < i {
			after, from = byEnd[k], reads[byEnd[k]].end
		}
		gap := rd.issued.Sub(from)
		if gap < 0 {
			gap = 0
		}
		t.Reads = append(t.Reads, Read{Off: rd.off, Len: rd.len, After: after, GapUS: gap.Microseconds()})
	}
	return t, t.check()
}
