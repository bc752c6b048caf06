package bulk

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vmthunder/vmthunder/internal/testbin"
	"github.com/vmthunder/vmthunder/sidecar/peers/pkitest"
	"github.com/vmthunder/vmthunder/sidecar/stack"
	"github.com/vmthunder/vmthunder/tests/e2e"
	"github.com/vmthunder/vmthunder/tests/guestimage"
)

// Mode is how the nodes of a wave read the template.
type Mode string

const (
	// Direct: every node replays the trace straight from the target
	// through its own link (the baseline).
	Direct Mode = "direct-iscsi"
	// Sidecar: every node's daemon fills its own cache from the origin.
	Sidecar Mode = "sidecar"
	// Peers: the daemons fill from each other, then the origin.
	Peers Mode = "sidecar+peers"
)

// Template is the template base/generation every node exports.
const (
	Template   = "bulk"
	Generation = "1"
)

// Options set up a Lab.
type Options struct {
	Bin      string // vmthunder
	Dir      string // scratch (removed by Close)
	Tag      string // names this run's namespaces (a few letters)
	MaxNodes int
	Caps     Caps
	Trace    *Trace
	// Image is the guest the trace was recorded from (it must match).
	Image *guestimage.Image
}

// Lab is the network, the origin and what every wave shares: the
// cluster CA, the nodes' certificates, the template's manifest.
type Lab struct {
	o         Options
	Net       *Net
	Origin    *Origin
	Nodes     []*Host
	Base      string // the template base's id on every node
	traceFile string
	replayBin string
	manifest  []byte
	certs     []PeerFiles // per node, signed by the cluster CA
	rogue     []PeerFiles // per node, signed by another CA
	waves     int
	qemu      *e2e.Lab
}

// NewLab builds the network (an origin and MaxNodes nodes), starts the
// target and makes the certificates and the manifest.
func NewLab(o Options) (l *Lab, err error) {
	if o.Image.Size != o.Trace.ImageSize {
		return nil, fmt.Errorf("the trace is of a %d-byte image, the guest image has %d: re-record it (tests/bulk/testdata/README.md)", o.Trace.ImageSize, o.Image.Size)
	}
	if sum, err := guestimage.FileSHA256(o.Image.Root); err != nil {
		return nil, err
	} else if sum != o.Trace.ImageSHA256 {
		return nil, fmt.Errorf("the trace was recorded from another guest image (sha256 %s, this one %s): re-record it (tests/bulk/testdata/README.md)", o.Trace.ImageSHA256, sum)
	}
	l = &Lab{o: o, Base: stack.TemplateBaseID(Template, Generation)}
	defer func() {
		if err != nil {
			l.Close()
		}
	}()
	if l.replayBin, err = testbin.Build("./tests/bulk/cmd/bulkreplay"); err != nil {
		return nil, err
	}
	if l.Net, err = NewNet(o.Tag); err != nil {
		return nil, err
	}
	oh, err := l.Net.AddHost("o", OriginIP, o.Caps.OriginMbit)
	if err != nil {
		return nil, err
	}
	for i := 0; i < o.MaxNodes; i++ {
		h, err := l.Net.AddHost("n"+strconv.Itoa(i), NodeIP(i), o.Caps.NodeMbit)
		if err != nil {
			return nil, err
		}
		l.Nodes = append(l.Nodes, h)
	}
	odir := filepath.Join(o.Dir, "origin")
	if err := os.MkdirAll(odir, 0o755); err != nil {
		return nil, err
	}
	if l.Origin, err = StartOrigin(oh, o.Image.Root, odir, time.Duration(o.Caps.DelayMS)*time.Millisecond); err != nil {
		return nil, err
	}
	l.traceFile = filepath.Join(o.Dir, "trace.json")
	if err := o.Trace.Save(l.traceFile); err != nil {
		return nil, err
	}
	// The manifest is made from the LUN's file, as a publisher would at
	// publish time (the nodes import it; its trust is not a peer's).
	mf := filepath.Join(o.Dir, "manifest")
	if out, err := exec.Command(o.Bin, "manifest", "make", "--origin", l.Origin.File, "--chunk-size", strconv.Itoa(ChunkSize), "-o", mf).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("vmthunder manifest make: %v: %s", err, out)
	}
	if l.manifest, err = os.ReadFile(mf); err != nil {
		return nil, err
	}
	if err := l.makeCerts(); err != nil {
		return nil, err
	}
	return l, nil
}

func (l *Lab) makeCerts() error {
	ca, err := pkitest.NewCA("bulk-cluster")
	if err != nil {
		return err
	}
	other, err := pkitest.NewCA("not-the-cluster")
	if err != nil {
		return err
	}
	key := make([]byte, 32)
	rand.Read(key)
	keyFile := filepath.Join(l.o.Dir, "gossip.key")
	if err := os.WriteFile(keyFile, []byte(hex.EncodeToString(key)), 0o600); err != nil {
		return err
	}
	for i := range l.Nodes {
		for _, c := range []struct {
			ca  *pkitest.CA
			dir string
			dst *[]PeerFiles
		}{{ca, "certs", &l.certs}, {other, "rogue", &l.rogue}} {
			dir := filepath.Join(l.o.Dir, c.dir, "n"+strconv.Itoa(i))
			if err := os.MkdirAll(dir, 0o700); err != nil {
				return err
			}
			caf, cf, kf, err := c.ca.WriteFiles(dir, nodeName(i))
			if err != nil {
				return err
			}
			*c.dst = append(*c.dst, PeerFiles{CA: caf, Cert: cf, Key: kf, GossipKey: keyFile})
		}
	}
	return nil
}

// SetTrace replaces the trace the next waves replay (another think-time
// scale of the same boot).
func (l *Lab) SetTrace(t *Trace) error {
	l.o.Trace = t
	return t.Save(l.traceFile)
}

func nodeName(i int) string { return fmt.Sprintf("node%d", i) }

// Close stops everything and removes the namespaces.
func (l *Lab) Close() {
	if l.qemu != nil {
		l.qemu.Close()
	}
	if l.Origin != nil {
		l.Origin.Stop()
	}
	if l.Net != nil {
		l.Net.Close()
	}
}

// WaveOptions say what one wave does.
type WaveOptions struct {
	Mode Mode
	N    int
	// Verify compares every replayed read with the origin's bytes.
	Verify bool
	// QEMU is how many nodes (from node 1 on) boot the real guest through
	// libvirt instead of replaying (sidecar modes only).
	QEMU int
	// Corrupt nodes serve corrupt chunks (VMTHUNDER_TEST_FAULT); Rogue
	// nodes have certificates of another CA.
	Corrupt, Rogue []int
	// Kill, when >= 0, is a replaying node whose daemon is killed
	// (SIGKILL) once its boot has completed KillAtRead reads.
	Kill       int
	KillAtRead int
}

// NodeResult is one node's boot.
type NodeResult struct {
	Node   int    `json:"node"`
	Kind   string `json:"kind"` // replay, qemu
	Killed bool   `json:"killed,omitempty"`
	Result
	FromOrigin    uint64  `json:"from_origin_bytes"`
	FromPeers     uint64  `json:"from_peers_bytes"`
	Served        uint64  `json:"served_bytes"`
	CorruptChunks uint64  `json:"corrupt_chunks"`
	CorruptMetric float64 `json:"corrupt_metric"` // vmthunder_peer_corrupt_chunks_total
	PeerErrors    float64 `json:"peer_errors"`    // vmthunder_peer_errors_total
	// Chunk requests to peers: successful ones and their mean time,
	// timed-out ones (vmthunder_peer_fetch_duration_seconds).
	FetchOK       float64 `json:"peer_fetch_ok"`
	FetchOKMeanMS float64 `json:"peer_fetch_ok_mean_ms"`
	FetchTimeouts float64 `json:"peer_fetch_timeouts"`
	CPUSeconds    float64 `json:"daemon_cpu_s"`
	// ServedTo is the chunk bytes this node served, by member
	// (vmthunder_peer_member_bytes_total).
	ServedTo map[string]float64 `json:"served_to,omitempty"`
}

// Wave is what one wave showed.
type Wave struct {
	Mode Mode `json:"mode"`
	N    int  `json:"nodes"`
	// OriginBytes is what the target sent (counted by the relay);
	// OriginLinkBytes what the origin's link carried (headers included).
	OriginBytes     int64         `json:"origin_bytes"`
	OriginLinkBytes int64         `json:"origin_link_bytes"`
	Wall            time.Duration `json:"-"`
	WallMS          float64       `json:"wall_ms"`
	// HostBusy is the share of the machine's CPU time in use during the
	// wave (every simulated node shares this machine's cores).
	HostBusy float64 `json:"host_cpu_busy"`
	// Packets tbf dropped on the origin's link and on the nodes' links,
	// and TCP segments the origin and the nodes retransmitted.
	OriginDrops   int64        `json:"origin_link_drops"`
	NodeDrops     int64        `json:"node_link_drops"`
	OriginRetrans int64        `json:"origin_tcp_retransmits"`
	NodeRetrans   int64        `json:"node_tcp_retransmits"`
	Nodes         []NodeResult `json:"node_results"`
	Logs          []string     `json:"-"` // daemons' logs, by node
}

// Run runs one wave on nodes 0..N-1 with fresh daemons (empty caches)
// and returns when every node's boot has finished.
func (l *Lab) Run(ctx context.Context, o WaveOptions) (*Wave, error) {
	if o.N > len(l.Nodes) {
		return nil, fmt.Errorf("wave of %d nodes on a lab of %d", o.N, len(l.Nodes))
	}
	l.waves++
	dir := filepath.Join(l.o.Dir, fmt.Sprintf("wave%d", l.waves))
	w := &Wave{Mode: o.Mode, N: o.N, Nodes: make([]NodeResult, o.N)}
	sent0, link0 := l.Origin.Sent(), l.Origin.Host.TXBytes()
	drops0, retrans0 := l.Origin.Host.Drops(), l.Origin.Host.Retransmits()
	var nodeDrops0, nodeRetrans0 int64
	for _, h := range l.Nodes[:o.N] {
		nodeDrops0 += h.Drops()
		nodeRetrans0 += h.Retransmits()
	}
	var daemons []*Daemon
	defer func() {
		var wg sync.WaitGroup
		for _, d := range daemons {
			if d != nil {
				wg.Add(1)
				go func() { defer wg.Done(); d.Stop() }()
			}
		}
		wg.Wait()
	}()
	var disks []*NBDClient
	defer func() {
		for _, c := range disks {
			if c != nil {
				c.Close()
			}
		}
	}()
	qemuNode := func(i int) bool { return o.Mode != Direct && i >= 1 && i <= o.QEMU && o.N > o.QEMU }
	exports := make([]string, o.N)
	exportNames := make([]string, o.N)
	if o.Mode != Direct {
		in := func(list []int, i int) bool {
			for _, x := range list {
				if x == i {
					return true
				}
			}
			return false
		}
		daemons = make([]*Daemon, o.N)
		errs := make([]error, o.N)
		var wg sync.WaitGroup
		start := func(i int) {
			defer wg.Done()
			c := DaemonConfig{}
			if o.Mode == Peers {
				pf := l.certs[i]
				if in(o.Rogue, i) {
					pf = l.rogue[i]
				}
				c.Peers = &pf
				if i > 0 {
					c.Join = NodeIP(0) + ":7946"
				}
				if in(o.Corrupt, i) {
					c.Env = []string{"VMTHUNDER_TEST_FAULT=corrupt-peer-chunks"}
				}
			}
			d, err := StartDaemon(l.o.Bin, l.Nodes[i], nodeName(i), filepath.Join(dir, nodeName(i)), c)
			if err != nil {
				errs[i] = err
				return
			}
			daemons[i] = d
			if o.Mode == Peers {
				if err := d.ImportManifest(l.Base, l.manifest); err != nil {
					errs[i] = fmt.Errorf("%s: import manifest: %w", d.Name, err)
					return
				}
			}
			e, err := d.Export("vm", l.Origin.URL(), Template, Generation)
			if err != nil {
				errs[i] = err
				return
			}
			exports[i], exportNames[i] = e.Socket, e.ExportName
		}
		// The first node is the seed the others join.
		wg.Add(1)
		start(0)
		for i := 1; i < o.N; i++ {
			wg.Add(1)
			go start(i)
		}
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				return nil, fmt.Errorf("node %d: %w", i, err)
			}
		}
		if o.Mode == Peers {
			if err := l.converge(ctx, daemons); err != nil {
				return nil, err
			}
		}
		disks = make([]*NBDClient, o.N)
		for i := range disks {
			if qemuNode(i) {
				continue
			}
			c, err := DialNBD(exports[i], exportNames[i])
			if err != nil {
				return nil, fmt.Errorf("node %d: %w", i, err)
			}
			disks[i] = c
		}
	}
	var verify io.ReaderAt
	if o.Verify {
		f, err := os.Open(l.Origin.File)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		verify = f
	}
	if o.QEMU > 0 && o.Mode != Direct && o.N > o.QEMU && l.qemu == nil {
		var err error
		if l.qemu, err = e2e.Open(); err != nil {
			return nil, err
		}
	}

	cpu0 := hostCPU()
	t0 := time.Now()
	var wg sync.WaitGroup
	var errMu sync.Mutex
	var werr error
	progress := make([]func(int), o.N)
	if o.Kill >= 0 && o.Kill < o.N && daemons != nil {
		w.Nodes[o.Kill].Killed = true
		var once sync.Once
		progress[o.Kill] = func(done int) {
			if done >= o.KillAtRead {
				once.Do(func() { daemons[o.Kill].Kill() })
			}
		}
	}
	for i := 0; i < o.N; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			nr := &w.Nodes[i]
			nr.Node, nr.Kind = i, "replay"
			switch {
			case o.Mode == Direct:
				r, err := l.replayDirect(ctx, i, o.Verify)
				if err != nil {
					errMu.Lock()
					werr = err
					errMu.Unlock()
					return
				}
				nr.Result = *r
			case qemuNode(i):
				nr.Kind = "qemu"
				vm := &e2e.VM{Name: e2e.UniqueName("vmt-bulk"), Image: l.o.Image, Nonce: nodeName(i),
					Disk: e2e.Disk{NBDSocket: exports[i], NBDExport: exportNames[i]}, Console: filepath.Join(dir, nodeName(i)+".console")}
				r, err := l.qemu.Boot(ctx, vm)
				if err != nil {
					nr.Failed, nr.FirstError = 1, err.Error()
					return
				}
				nr.Boot, nr.Bytes = r.BootTime, r.Bytes
				nr.BootMS = float64(r.BootTime.Microseconds()) / 1000
			default:
				nr.Result = *Replay(l.o.Trace, disks[i], ReplayOptions{Verify: verify, Progress: progress[i]})
			}
		}(i)
	}
	wg.Wait()
	w.Wall = time.Since(t0)
	w.HostBusy = hostCPU().busySince(cpu0)
	w.WallMS = float64(w.Wall.Microseconds()) / 1000
	if werr != nil {
		return nil, werr
	}
	w.OriginBytes, w.OriginLinkBytes = l.Origin.Sent()-sent0, l.Origin.Host.TXBytes()-link0
	w.OriginDrops, w.OriginRetrans = l.Origin.Host.Drops()-drops0, l.Origin.Host.Retransmits()-retrans0
	for _, h := range l.Nodes[:o.N] {
		w.NodeDrops += h.Drops()
		w.NodeRetrans += h.Retransmits()
	}
	w.NodeDrops -= nodeDrops0
	w.NodeRetrans -= nodeRetrans0
	for i, d := range daemons {
		if d == nil || w.Nodes[i].Killed {
			continue
		}
		nr := &w.Nodes[i]
		if b, err := d.Base(l.Base); err == nil && b.Peers != nil {
			nr.FromOrigin, nr.FromPeers, nr.Served, nr.CorruptChunks = b.Peers.FromOriginBytes, b.Peers.FromPeersBytes, b.Peers.ServedBytes, b.Peers.CorruptChunks
		}
		nr.CPUSeconds = d.CPUSeconds()
		if o.Mode == Peers {
			nr.CorruptMetric, _ = d.Metric("vmthunder_peer_corrupt_chunks_total")
			nr.PeerErrors, _ = d.Metric("vmthunder_peer_errors_total")
			nr.FetchOK, _ = d.MetricWhere("vmthunder_peer_fetch_duration_seconds_count", `outcome="ok"`)
			if sum, err := d.MetricWhere("vmthunder_peer_fetch_duration_seconds_sum", `outcome="ok"`); err == nil && nr.FetchOK > 0 {
				nr.FetchOKMeanMS = sum / nr.FetchOK * 1000
			}
			nr.ServedTo, _ = d.MetricBy("vmthunder_peer_member_bytes_total", `direction="served"`, "peer")
			nr.FetchTimeouts, _ = d.MetricWhere("vmthunder_peer_fetch_duration_seconds_count", `outcome="timeout"`)
		}
	}
	for _, d := range daemons {
		if d != nil {
			w.Logs = append(w.Logs, d.Log())
		}
	}
	return w, nil
}

// cpuTimes are /proc/stat's first line: busy and total clock ticks.
type cpuTimes struct{ busy, total float64 }

func hostCPU() cpuTimes {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return cpuTimes{}
	}
	line, _, _ := strings.Cut(string(b), "\n")
	var c cpuTimes
	for i, f := range strings.Fields(line)[1:] {
		v, _ := strconv.ParseFloat(f, 64)
		c.total += v
		if i != 3 && i != 4 { // idle, iowait
			c.busy += v
		}
	}
	return c
}

func (c cpuTimes) busySince(from cpuTimes) float64 {
	if c.total <= from.total {
		return 0
	}
	return (c.busy - from.busy) / (c.total - from.total)
}

// converge waits until every daemon sees every other serving the base, so
// a wave starts with the cluster formed (as after the exports of a boot
// request), not with each node alone.
func (l *Lab) converge(ctx context.Context, ds []*Daemon) error {
	deadline := time.Now().Add(60 * time.Second)
	for {
		ok, why := true, ""
		for _, d := range ds {
			p, err := d.Peers()
			if err != nil {
				ok, why = false, err.Error()
				break
			}
			serving := 0
			for _, m := range p.Members {
				for _, b := range m.Bases {
					if b == l.Base {
						serving++
					}
				}
			}
			if serving < len(ds) {
				ok, why = false, fmt.Sprintf("%s sees %d of %d members serving %s", d.Name, serving, len(ds), l.Base)
				break
			}
		}
		if ok {
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("peers did not converge in 60 s: %s", why)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// replayDirect replays the trace on node i straight from the target,
// from inside the node's namespace.
func (l *Lab) replayDirect(ctx context.Context, i int, verify bool) (*Result, error) {
	args := []string{"-trace", l.traceFile, "-iscsi", l.Origin.URL()}
	if verify {
		args = append(args, "-verify", l.Origin.File)
	}
	cmd := l.Nodes[i].Exec(l.replayBin, args...)
	out, err := cmd.Output()
	if err != nil {
		msg := ""
		if ee, ok := err.(*exec.ExitError); ok {
			msg = string(ee.Stderr)
		}
		return nil, fmt.Errorf("node %d direct replay: %v: %s", i, err, msg)
	}
	var r Result
	if err := json.Unmarshal(out, &r); err != nil {
		return nil, fmt.Errorf("node %d direct replay said %q: %w", i, out, err)
	}
	r.Boot = time.Duration(r.BootMS * float64(time.Millisecond))
	return &r, nil
}
