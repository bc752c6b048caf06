package e2e

import (
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
)

// Node is the sidecar on this host as the tests and the demo use it: the
// daemon (the real thing), or, only when VMTHUNDER_E2E_STANDIN=export is
// set, one `vmthunder export` process per export, which cannot share a
// cache between exports that run at once.
type Node interface {
	// Export makes an export of the node's origin for one guest: mode
	// "cow" (over the shared base cache) or "write-through".
	Export(id, mode string) (*Export, error)
	// Stats are the export's counters; ok is false when the node does not
	// report any (the stand-in).
	Stats(id string) (st ExportStats, ok bool, err error)
	Remove(id string) error
	// Restart stops the sidecar and starts it again on the same state.
	Restart() error
	Kind() string
	Close()
}

// NewNode starts the sidecar for origin URL, with its state in dir.
func NewNode(bin, dir, originURL, base string, o DaemonOptions) (Node, error) {
	if os.Getenv("VMTHUNDER_E2E_STANDIN") == "export" {
		return &procNode{bin: bin, dir: dir, origin: originURL, procs: map[string]*ExportProc{}}, MakeShared(dir)
	}
	d, err := StartDaemon(bin, dir, o)
	if err != nil {
		return nil, err
	}
	return &daemonNode{d: d, origin: originURL, base: base}, nil
}

type daemonNode struct {
	d      *Daemon
	origin string
	base   string
}

func (n *daemonNode) Kind() string { return "daemon" }

func (n *daemonNode) Export(id, mode string) (*Export, error) {
	base := n.base
	if mode == "write-through" {
		// A persistent volume is its own base.
		base = ""
	}
	// The origin does not change during a test: one generation.
	return n.d.CreateExport(id, n.origin, base, "1", mode)
}

func (n *daemonNode) Stats(id string) (ExportStats, bool, error) {
	e, err := n.d.GetExport(id)
	if err != nil {
		return ExportStats{}, false, err
	}
	return e.Stats, true, nil
}

func (n *daemonNode) Remove(id string) error { return n.d.DeleteExport(id) }
func (n *daemonNode) Restart() error         { return n.d.Restart() }
func (n *daemonNode) Close()                 { n.d.Close() }

// Daemon is the daemon behind a node, nil for the stand-in.
func DaemonOf(n Node) *Daemon {
	if d, ok := n.(*daemonNode); ok {
		return d.d
	}
	return nil
}

type procNode struct {
	bin, dir, origin string
	mu               sync.Mutex
	procs            map[string]*ExportProc
}

func (n *procNode) Kind() string { return "vmthunder-export-standin" }

func (n *procNode) Export(id, mode string) (*Export, error) {
	o := ExportOptions{Cache: filepath.Join(n.dir, "cache")}
	switch mode {
	case "cow":
		o.COW = filepath.Join(n.dir, id+".cow")
	case "write-through":
		o.WriteThrough = true
	default:
		return nil, fmt.Errorf("stand-in: mode %q", mode)
	}
	p, err := StartExport(n.bin, filepath.Join(n.dir, id+".sock"), id, n.origin, o)
	if err != nil {
		return nil, err
	}
	n.mu.Lock()
	n.procs[id] = p
	n.mu.Unlock()
	return &Export{ID: id, Mode: mode, Socket: p.Socket, ExportName: id, CowPath: o.COW}, nil
}

func (n *procNode) Stats(id string) (ExportStats, bool, error) { return ExportStats{}, false, nil }

func (n *procNode) Remove(id string) error {
	n.mu.Lock()
	p := n.procs[id]
	delete(n.procs, id)
	n.mu.Unlock()
	if p == nil {
		return fmt.Errorf("no export %s", id)
	}
	return p.Stop()
}

func (n *procNode) Restart() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, p := range n.procs {
		if err := p.Stop(); err != nil {
			return err
		}
		if err := p.Start(); err != nil {
			return err
		}
	}
	return nil
}

func (n *procNode) Close() {
	n.mu.Lock()
	defer n.mu.Unlock()
	for id, p := range n.procs {
		p.Stop()
		delete(n.procs, id)
	}
}

// ReadNBD reads length bytes at off from an NBD export on a unix socket
// with qemu-io (an independent client).
func ReadNBD(socket, export string, off, length int64) ([]byte, error) {
	spec := fmt.Sprintf("driver=nbd,server.type=unix,server.path=%s,export=%s", socket, export)
	out, err := exec.Command("qemu-io", "-r", "--image-opts", spec, "-c", fmt.Sprintf("read -v %d %d", off, length)).CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("qemu-io read from %s: %v: %s", socket, err, out)
	}
	var data []byte
	for _, l := range strings.Split(string(out), "\n") {
		// "0000a000:  56 4d 54 ...  VMTHUNDER.WRITE."
		addr, rest, ok := strings.Cut(l, ":  ")
		if !ok || len(addr) != 8 {
			continue
		}
		f := strings.Fields(rest)
		for _, h := range f[:min(16, len(f))] {
			b, err := hex.DecodeString(h)
			if err != nil || len(b) != 1 {
				break
			}
			data = append(data, b[0])
		}
	}
	if int64(len(data)) < length {
		return nil, fmt.Errorf("qemu-io read %d of %d bytes: %s", len(data), length, out)
	}
	return data[:length], nil
}

// BlockText trims a block at its first NUL or newline.
func BlockText(b []byte) string {
	if i := strings.IndexAny(string(b), "\x00\n"); i >= 0 {
		b = b[:i]
	}
	return string(b)
}
