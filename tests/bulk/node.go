package bulk

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"github.com/vmthunder/vmthunder/sidecar/api"
	"github.com/vmthunder/vmthunder/sidecar/api/client"
	"github.com/vmthunder/vmthunder/tests/e2e"
)

// ChunkSize is the nodes' [cache] chunk_size, and the manifest's.
const ChunkSize = 64 << 10

// PeerFiles are a node's [peers] certificate files and the cluster's
// gossip key.
type PeerFiles struct {
	CA, Cert, Key, GossipKey string
}

// Daemon is one node's `vmthunder daemon`, run in the node's namespace.
type Daemon struct {
	Host *Host
	Name string
	Dir  string
	API  *client.Client
	proc *e2e.Daemon
}

// DaemonConfig is what differs between the nodes' daemons.
type DaemonConfig struct {
	Peers *PeerFiles // nil: peers off
	Join  string     // the first node's gossip address ("" for the first)
	Env   []string   // extra environment (VMTHUNDER_TEST_FAULT)
}

// StartDaemon writes a config under dir and starts bin's daemon in the
// host's namespace; it returns once the API answers.
func StartDaemon(bin string, h *Host, name, dir string, c DaemonConfig) (*Daemon, error) {
	o := e2e.DaemonOptions{ChunkSize: strconv.Itoa(ChunkSize), Command: h.Exec, Env: c.Env}
	if p := c.Peers; p != nil {
		o.Sections = fmt.Sprintf(`[peers]
enabled = true
bind = %s:7946
listen = %s:7947
ca_file = %s
cert_file = %s
key_file = %s
gossip_key_file = %s
`, h.IP, h.IP, p.CA, p.Cert, p.Key, p.GossipKey)
		if c.Join != "" {
			o.Sections += "join = " + c.Join + "\n"
		}
	}
	proc, err := e2e.StartDaemon(bin, dir, o)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return &Daemon{Host: h, Name: name, Dir: dir, API: client.New(proc.API), proc: proc}, nil
}

// LogTail is the end of the daemon's log.
func (d *Daemon) LogTail(n int) string { return d.proc.LogTail(n) }

// Log is the daemon's whole log.
func (d *Daemon) Log() string { return d.proc.Log() }

// Kill ends the daemon at once (SIGKILL), as a crash would. `ip netns
// exec` execs the daemon, so the process is the daemon itself.
func (d *Daemon) Kill() { d.proc.Kill() }

// Stop asks the daemon to finish and waits up to 30 s, then kills it.
func (d *Daemon) Stop() { d.proc.Stop() }

func (d *Daemon) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 60*time.Second)
}

// Export makes cow export id of template base/generation over origin.
func (d *Daemon) Export(id, origin, base, generation string) (*api.Export, error) {
	ctx, cancel := d.ctx()
	defer cancel()
	e, err := d.API.Create(ctx, api.CreateRequest{ID: id, Origin: origin, Base: base, Generation: generation, Mode: "cow"})
	if err != nil {
		return nil, fmt.Errorf("%s: create export %s: %w", d.Name, id, err)
	}
	if err := shareSocket(e.Socket); err != nil {
		return nil, err
	}
	return e, nil
}

// shareSocket gives an NBD socket to QEMU's group.
func shareSocket(path string) error {
	out, err := exec.Command("id", "-g", "libvirt-qemu").Output()
	if err != nil {
		return fmt.Errorf("no user libvirt-qemu (Debian package libvirt-daemon-system)")
	}
	gid, _ := strconv.Atoi(strings.TrimSpace(string(out)))
	return os.Chown(path, -1, gid)
}

// ImportManifest stores a template base's manifest on the node.
func (d *Daemon) ImportManifest(base string, raw []byte) error {
	ctx, cancel := d.ctx()
	defer cancel()
	_, err := d.API.ImportManifest(ctx, base, raw, "")
	return err
}

// Base is the node's view of a base.
func (d *Daemon) Base(id string) (*api.Base, error) {
	ctx, cancel := d.ctx()
	defer cancel()
	return d.API.Base(ctx, id)
}

// Peers is the node's view of the cluster.
func (d *Daemon) Peers() (*api.Peers, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return d.API.Peers(ctx)
}

// MetricBy is a metric's samples whose labels contain filter, summed by
// the value of label (e.g. bytes by peer).
func (d *Daemon) MetricBy(name, filter, label string) (map[string]float64, error) {
	out := map[string]float64{}
	lines, err := d.metricLines(name)
	if err != nil {
		return nil, err
	}
	for _, l := range lines {
		if !strings.Contains(l, filter) {
			continue
		}
		_, after, ok := strings.Cut(l, label+`="`)
		if !ok {
			continue
		}
		key, _, _ := strings.Cut(after, `"`)
		f := strings.Fields(l)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err != nil {
			return nil, fmt.Errorf("metric line %q: %w", l, err)
		}
		out[key] += v
	}
	return out, nil
}

// metricLines are the sample lines of metric name.
func (d *Daemon) metricLines(name string) ([]string, error) {
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", d.proc.API)
		}}}
	resp, err := hc.Get("http://vmthunder/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET /metrics: %s", resp.Status)
	}
	var lines []string
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		l := sc.Text()
		if rest, ok := strings.CutPrefix(l, name); ok && rest != "" && (rest[0] == '{' || rest[0] == ' ') {
			lines = append(lines, l)
		}
	}
	return lines, sc.Err()
}

// CPUSeconds is the CPU time the daemon has used (user and system).
func (d *Daemon) CPUSeconds() float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", d.proc.Pid()))
	if err != nil {
		return 0
	}
	// Fields after the command name (which may hold spaces): state is
	// field 3, utime and stime fields 14 and 15, in clock ticks (100/s).
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(f) < 13 {
		return 0
	}
	u, _ := strconv.ParseFloat(f[11], 64)
	k, _ := strconv.ParseFloat(f[12], 64)
	return (u + k) / 100
}

// Metric sums the samples of a Prometheus counter or gauge on the node
// (GET /metrics on the API socket), whatever their labels.
func (d *Daemon) Metric(name string) (float64, error) { return d.MetricWhere(name, "") }

// MetricWhere is Metric over the samples whose labels contain label
// (e.g. `outcome="ok"`).
func (d *Daemon) MetricWhere(name, label string) (float64, error) {
	lines, err := d.metricLines(name)
	if err != nil {
		return 0, err
	}
	var sum float64
	found := false
	for _, l := range lines {
		if !strings.Contains(l[len(name):], label) {
			continue
		}
		f := strings.Fields(l)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err != nil {
			return 0, fmt.Errorf("metric line %q: %w", l, err)
		}
		sum += v
		found = true
	}
	if !found {
		return 0, fmt.Errorf("metric %s not exported by %s", name, d.Name)
	}
	return sum, nil
}
