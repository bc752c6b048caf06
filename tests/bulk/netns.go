package bulk

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Caps are the link limits of a run.
type Caps struct {
	OriginMbit int // the origin's link (tgtd's namespace), both ways
	NodeMbit   int // each node's link, both ways
	DelayMS    int // added by the origin's relay to what tgtd sends
}

// CapsFromEnv are the defaults of issue 14 (origin 200 Mbit/s, node
// 1 Gbit/s, 1 ms delay), overridden by BULK_ORIGIN_MBIT, BULK_NODE_MBIT
// and BULK_DELAY_MS.
func CapsFromEnv() (Caps, error) {
	c := Caps{OriginMbit: 200, NodeMbit: 1000, DelayMS: 1}
	for _, v := range []struct {
		env string
		dst *int
	}{{"BULK_ORIGIN_MBIT", &c.OriginMbit}, {"BULK_NODE_MBIT", &c.NodeMbit}, {"BULK_DELAY_MS", &c.DelayMS}} {
		if s := os.Getenv(v.env); s != "" {
			n, err := strconv.Atoi(s)
			if err != nil || n < 0 || (n == 0 && v.dst != &c.DelayMS) {
				return c, fmt.Errorf("%s=%q: want a positive whole number", v.env, s)
			}
			*v.dst = n
		}
	}
	return c, nil
}

// Net is a bridge with one network namespace per simulated host, each
// joined to it by a veth pair shaped with tc tbf in both directions.
type Net struct {
	prefix string // names of this run's namespaces and links
	bridge string
	hosts  []*Host
}

// Host is one namespace on the bridge.
type Host struct {
	NS   string // network namespace name
	IP   string
	veth string // the bridge side of its link
}

// NewNet makes the bridge. tag tells runs apart (a few letters).
func NewNet(tag string) (*Net, error) {
	if os.Geteuid() != 0 {
		return nil, fmt.Errorf("needs root (network namespaces, tc)")
	}
	n := &Net{prefix: "vb" + tag}
	n.bridge = n.prefix + "br"
	n.cleanStale()
	for _, c := range [][]string{
		{"ip", "link", "add", n.bridge, "type", "bridge"},
		{"ip", "link", "set", n.bridge, "up"},
	} {
		if err := run(c...); err != nil {
			n.Close()
			return nil, err
		}
	}
	return n, nil
}

// cleanStale removes what a killed run with the same tag left.
func (n *Net) cleanStale() {
	out, _ := exec.Command("ip", "netns", "list").Output()
	for _, l := range strings.Split(string(out), "\n") {
		if f := strings.Fields(l); len(f) > 0 && strings.HasPrefix(f[0], n.prefix+"-") {
			exec.Command("ip", "netns", "del", f[0]).Run()
		}
	}
	exec.Command("ip", "link", "del", n.bridge).Run()
}

func run(args ...string) error {
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %v: %s", strings.Join(args, " "), err, out)
	}
	return nil
}

// AddHost makes namespace <prefix>-name with address ip/16 on the bridge,
// its link capped at mbit both ways.
func (n *Net) AddHost(name, ip string, mbit int) (*Host, error) {
	h := &Host{NS: n.prefix + "-" + name, IP: ip, veth: n.prefix + name}
	if len(h.veth) > 15 {
		return nil, fmt.Errorf("link name %q too long", h.veth)
	}
	exec.Command("ip", "netns", "del", h.NS).Run()
	cmds := [][]string{
		{"ip", "netns", "add", h.NS},
		{"ip", "link", "add", h.veth, "type", "veth", "peer", "name", "eth0", "netns", h.NS},
		{"ip", "link", "set", h.veth, "master", n.bridge},
		{"ip", "link", "set", h.veth, "up"},
		{"ip", "netns", "exec", h.NS, "ip", "addr", "add", ip + "/16", "dev", "eth0"},
		{"ip", "netns", "exec", h.NS, "ip", "link", "set", "eth0", "up"},
		{"ip", "netns", "exec", h.NS, "ip", "link", "set", "lo", "up"},
	}
	// tbf on both ends: the bridge side shapes what the host receives,
	// the namespace side what it sends.
	cmds = append(cmds, tbf(nil, h.veth, mbit), tbf([]string{"ip", "netns", "exec", h.NS}, "eth0", mbit))
	for _, c := range cmds {
		if err := run(c...); err != nil {
			exec.Command("ip", "netns", "del", h.NS).Run()
			return nil, err
		}
	}
	n.hosts = append(n.hosts, h)
	return h, nil
}

func tbf(prefix []string, dev string, mbit int) []string {
	// A burst of 4 ms at the rate (at least 32 KiB) keeps tbf exact at
	// 1 Gbit/s without a high-resolution timer per packet.
	burst := max(32<<10, mbit*1_000_000/8/250)
	return append(append([]string(nil), prefix...), "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
		"rate", fmt.Sprintf("%dmbit", mbit), "burst", strconv.Itoa(burst), "latency", "100ms")
}

// Exec is a command run in the host's namespace.
func (h *Host) Exec(name string, args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", h.NS, name}, args...)...)
}

// RXBytes is what the host's link has delivered to it (the bridge side's
// transmit counter), headers included.
func (h *Host) RXBytes() int64 { return sysCounter(h.veth, "tx_bytes") }

// TXBytes is what the host has sent on its link.
func (h *Host) TXBytes() int64 { return sysCounter(h.veth, "rx_bytes") }

func sysCounter(dev, name string) int64 {
	b, err := os.ReadFile("/sys/class/net/" + dev + "/statistics/" + name)
	if err != nil {
		return -1
	}
	v, _ := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	return v
}

// Drops is the packets tbf dropped on the host's link, both ends.
func (h *Host) Drops() int64 {
	return tcDrops(exec.Command("tc", "-s", "qdisc", "show", "dev", h.veth)) +
		tcDrops(h.Exec("tc", "-s", "qdisc", "show", "dev", "eth0"))
}

func tcDrops(cmd *exec.Cmd) int64 {
	out, err := cmd.Output()
	if err != nil {
		return 0
	}
	// " Sent 123 bytes 4 pkt (dropped 5, overlimits 6 requeues 0)"
	var n int64
	for _, l := range strings.Split(string(out), "\n") {
		if _, after, ok := strings.Cut(l, "(dropped "); ok {
			v, _ := strconv.ParseInt(strings.TrimRight(strings.Fields(after)[0], ","), 10, 64)
			n += v
		}
	}
	return n
}

// Retransmits is the TCP segments the host's namespace retransmitted
// (RetransSegs of /proc/net/snmp there).
func (h *Host) Retransmits() int64 {
	out, err := h.Exec("cat", "/proc/net/snmp").Output()
	if err != nil {
		return 0
	}
	var names []string
	for _, l := range strings.Split(string(out), "\n") {
		f := strings.Fields(l)
		if len(f) == 0 || f[0] != "Tcp:" {
			continue
		}
		if names == nil {
			names = f
			continue
		}
		for i, name := range names {
			if name == "RetransSegs" && i < len(f) {
				v, _ := strconv.ParseInt(f[i], 10, 64)
				return v
			}
		}
	}
	return 0
}

// Do runs fn on an OS thread inside the host's namespace: sockets fn
// makes there stay in it (a listener keeps accepting there, a connection
// keeps its route), whatever thread uses them later.
func (h *Host) Do(fn func() error) error {
	runtime.LockOSThread()
	self, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer self.Close()
	target, err := os.Open("/run/netns/" + h.NS)
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("setns %s: %w", h.NS, err)
	}
	ferr := fn()
	if err := unix.Setns(int(self.Fd()), unix.CLONE_NEWNET); err != nil {
		// The thread stays locked and dies with this goroutine rather
		// than run other goroutines in the wrong namespace.
		return fmt.Errorf("setns back from %s: %w", h.NS, err)
	}
	runtime.UnlockOSThread()
	return ferr
}

// Close removes every namespace and link of the run.
func (n *Net) Close() {
	for _, h := range n.hosts {
		exec.Command("ip", "netns", "del", h.NS).Run()
		exec.Command("ip", "link", "del", h.veth).Run()
	}
	n.hosts = nil
	exec.Command("ip", "link", "del", n.bridge).Run()
}

// NodeIP is node i's address, OriginIP the origin's.
const OriginIP = "10.233.0.2"

func NodeIP(i int) string { return fmt.Sprintf("10.233.%d.%d", 1+i/250, 1+i%250) }
