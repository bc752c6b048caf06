// Package e2e boots real guests through libvirt/QEMU (TCG) from the
// sidecar's NBD exports and from the iSCSI target directly, and measures
// what each boot cost: seconds to the guest's marker, bytes from the
// origin and from the cache. The tests in this package, the demo
// (tests/demo) and bench-boot (tests/e2e/benchboot) share it.
//
// The tests run as root and need tgtd, libvirtd (started if not running),
// qemu-system-x86, qemu-utils, e2fsprogs, busybox-static and a Debian
// kernel in /boot. They use the daemon of $VMTHUNDER_BIN (or one built
// from this tree); VMTHUNDER_E2E_STANDIN=export runs them against one
// `vmthunder export` process per export instead, for work on the data
// path without the daemon.
package e2e

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"

	"libvirt.org/go/libvirt"
	"libvirt.org/go/libvirtxml"

	"github.com/vmthunder/vmthunder/tests/guestimage"
)

// URI is the libvirt connection the harness uses (QEMU as root, guests as
// libvirt-qemu).
const URI = "qemu:///system"

// Lab is one connection to libvirtd with a lifecycle event loop.
type Lab struct {
	conn *libvirt.Connect
	cb   int

	mu      sync.Mutex
	waiters map[string][]chan libvirt.DomainEventType
	names   map[string]bool // domains this lab created, destroyed on Close
}

var eventOnce sync.Once

// Open connects to libvirtd, starting virtlogd and libvirtd if they are not
// running (the harness runs as root on a test box without systemd).
func Open() (*Lab, error) {
	eventOnce.Do(func() {
		// The default event loop must exist before the first connection.
		if err := libvirt.EventRegisterDefaultImpl(); err == nil {
			go func() {
				for {
					if err := libvirt.EventRunDefaultImpl(); err != nil {
						time.Sleep(100 * time.Millisecond)
					}
				}
			}()
		}
	})
	conn, err := libvirt.NewConnect(URI)
	if err != nil {
		if err := startDaemons(); err != nil {
			return nil, err
		}
		deadline := time.Now().Add(30 * time.Second)
		for {
			conn, err = libvirt.NewConnect(URI)
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				return nil, fmt.Errorf("libvirtd did not answer on %s after starting it: %w", URI, err)
			}
			time.Sleep(300 * time.Millisecond)
		}
	}
	l := &Lab{conn: conn, waiters: map[string][]chan libvirt.DomainEventType{}, names: map[string]bool{}}
	l.cb, err = conn.DomainEventLifecycleRegister(nil, func(c *libvirt.Connect, d *libvirt.Domain, ev *libvirt.DomainEventLifecycle) {
		name, err := d.GetName()
		if err != nil {
			return
		}
		l.mu.Lock()
		for _, ch := range l.waiters[name] {
			select {
			case ch <- ev.Event:
			default:
			}
		}
		l.mu.Unlock()
	})
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("register lifecycle events: %w", err)
	}
	return l, nil
}

func startDaemons() error {
	for _, d := range []string{"virtlogd", "libvirtd"} {
		if exec.Command("pgrep", "-x", d).Run() == nil {
			continue
		}
		if out, err := exec.Command(d, "-d").CombinedOutput(); err != nil {
			return fmt.Errorf("start %s (Debian package libvirt-daemon-system): %v: %s", d, err, out)
		}
	}
	return nil
}

// Close destroys every domain the lab started that still runs.
func (l *Lab) Close() {
	l.mu.Lock()
	names := make([]string, 0, len(l.names))
	for n := range l.names {
		names = append(names, n)
	}
	l.mu.Unlock()
	for _, n := range names {
		l.Destroy(n)
	}
	l.conn.DomainEventDeregister(l.cb)
	l.conn.Close()
}

// Destroy stops a domain by name if it runs (the lab's domains are
// transient, so it also disappears).
func (l *Lab) Destroy(name string) {
	if d, err := l.conn.LookupDomainByName(name); err == nil {
		d.Destroy()
		d.Free()
	}
	l.mu.Lock()
	delete(l.names, name)
	l.mu.Unlock()
}

// UniqueName is a domain name no other run on this host uses.
func UniqueName(prefix string) string {
	b := make([]byte, 4)
	rand.Read(b)
	return fmt.Sprintf("%s-%d-%s", prefix, os.Getpid(), hex.EncodeToString(b))
}

// ReconnectDelay is the NBD disks' reconnect delay in seconds: QEMU holds
// a guest's requests this long after losing the sidecar, then fails them.
// It must cover a sidecar restart (stop, start, iSCSI login).
var ReconnectDelay = 10

// Disk is where a guest's root disk comes from. Exactly one kind is set.
type Disk struct {
	// NBD export on a unix socket (the sidecar).
	NBDSocket, NBDExport string
	// iSCSI target read by QEMU's own driver; guest writes go to Overlay,
	// a qcow2 file whose backing is the LUN (made by NewISCSIOverlay).
	ISCSIHost    string
	ISCSIPort    int
	ISCSIIQN     string
	ISCSILUN     int
	ISCSIOverlay string
	// File is a local raw file QEMU reads directly.
	File string
	// Reconnect passes the NBD disk to QEMU on its command line with
	// reconnect-delay: libvirt 9.0 (Debian 12) accepts <reconnect delay>
	// on an NBD source but does not hand it to QEMU, and without it QEMU
	// fails every request once the sidecar's socket closes.
	Reconnect bool
}

// VM describes one boot.
type VM struct {
	Name    string
	Image   *guestimage.Image
	Disk    Disk
	Nonce   string
	Console string // serial log path (virtlogd writes it)
	MemMiB  uint
}

// Result is what one boot showed.
type Result struct {
	Name     string
	Nonce    string
	BootTime time.Duration // start of the domain to the marker on the console
	StopTime time.Duration // start to the domain's stop event
	Bytes    int64         // what the guest says it read
	Console  string
}

func (vm *VM) xml() (string, error) {
	mem := vm.MemMiB
	if mem == 0 {
		mem = 384
	}
	disk := libvirtxml.DomainDisk{
		Device: "disk",
		Target: &libvirtxml.DomainDiskTarget{Dev: "vda", Bus: "virtio"},
	}
	var qemuArgs []string
	switch d := vm.Disk; {
	case d.NBDSocket != "" && d.Reconnect:
		nbd, _ := json.Marshal(map[string]any{"driver": "nbd", "node-name": "vmt-nbd", "export": d.NBDExport,
			"server": map[string]string{"type": "unix", "path": d.NBDSocket}, "reconnect-delay": ReconnectDelay})
		qemuArgs = []string{"-blockdev", string(nbd),
			"-blockdev", `{"driver":"raw","node-name":"vmt-root","file":"vmt-nbd"}`,
			"-device", `{"driver":"virtio-blk-pci","drive":"vmt-root","id":"vmt-vda"}`}
	case d.NBDSocket != "":
		disk.Driver = &libvirtxml.DomainDiskDriver{Name: "qemu", Type: "raw"}
		disk.Source = &libvirtxml.DomainDiskSource{Network: &libvirtxml.DomainDiskSourceNetwork{
			Protocol: "nbd", Name: d.NBDExport,
			Hosts: []libvirtxml.DomainDiskSourceHost{{Transport: "unix", Socket: d.NBDSocket}},
			// A restarted sidecar is reconnected to instead of failing the guest's I/O.
			Reconnect: &libvirtxml.DomainDiskSourceNetworkReconnect{Delay: strconv.Itoa(ReconnectDelay)},
		}}
	case d.ISCSIOverlay != "":
		disk.Driver = &libvirtxml.DomainDiskDriver{Name: "qemu", Type: "qcow2"}
		disk.Source = &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: d.ISCSIOverlay}}
		disk.BackingStore = &libvirtxml.DomainDiskBackingStore{
			Format: &libvirtxml.DomainDiskFormat{Type: "raw"},
			Source: &libvirtxml.DomainDiskSource{Network: &libvirtxml.DomainDiskSourceNetwork{
				Protocol: "iscsi", Name: fmt.Sprintf("%s/%d", d.ISCSIIQN, d.ISCSILUN),
				Hosts: []libvirtxml.DomainDiskSourceHost{{Name: d.ISCSIHost, Port: strconv.Itoa(d.ISCSIPort)}},
			}},
			BackingStore: &libvirtxml.DomainDiskBackingStore{},
		}
	case d.File != "":
		disk.Driver = &libvirtxml.DomainDiskDriver{Name: "qemu", Type: "raw"}
		disk.Source = &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: d.File}}
	default:
		return "", errors.New("e2e: VM has no disk")
	}
	var disks []libvirtxml.DomainDisk
	if qemuArgs == nil {
		disks = append(disks, disk)
	}
	dom := &libvirtxml.Domain{
		Type:   "qemu",
		Name:   vm.Name,
		Memory: &libvirtxml.DomainMemory{Value: mem, Unit: "MiB"},
		VCPU:   &libvirtxml.DomainVCPU{Value: 1},
		OS: &libvirtxml.DomainOS{
			Type:    &libvirtxml.DomainOSType{Type: "hvm", Arch: "x86_64", Machine: "pc"},
			Kernel:  vm.Image.Kernel,
			Initrd:  vm.Image.Initrd,
			Cmdline: vm.Image.Cmdline(vm.Nonce),
		},
		// ACPI, or the guest's poweroff only halts and the domain never stops.
		Features:   &libvirtxml.DomainFeatureList{ACPI: &libvirtxml.DomainFeature{}},
		OnPoweroff: "destroy",
		OnReboot:   "destroy",
		OnCrash:    "destroy",
		Devices: &libvirtxml.DomainDeviceList{
			Emulator: "/usr/bin/qemu-system-x86_64",
			Disks:    disks,
			Serials: []libvirtxml.DomainSerial{{
				Source: &libvirtxml.DomainChardevSource{File: &libvirtxml.DomainChardevSourceFile{Path: vm.Console}},
			}},
			MemBalloon: &libvirtxml.DomainMemBalloon{Model: "none"},
		},
	}
	if qemuArgs != nil {
		dom.QEMUCommandline = &libvirtxml.DomainQEMUCommandline{}
		for _, a := range qemuArgs {
			dom.QEMUCommandline.Args = append(dom.QEMUCommandline.Args, libvirtxml.DomainQEMUCommandlineArg{Value: a})
		}
	}
	return dom.Marshal()
}

// Boot starts vm and waits until it prints the marker and stops, or ctx
// ends (then the domain is destroyed). The error names what the console
// showed last.
func (l *Lab) Boot(ctx context.Context, vm *VM) (*Result, error) {
	return l.BootWith(ctx, vm, nil)
}

// BootWith is Boot with a hook called once the domain runs (a test
// restarts the daemon there).
func (l *Lab) BootWith(ctx context.Context, vm *VM, running func()) (*Result, error) {
	x, err := vm.xml()
	if err != nil {
		return nil, err
	}
	os.Remove(vm.Console)
	ev := make(chan libvirt.DomainEventType, 16)
	l.mu.Lock()
	l.waiters[vm.Name] = append(l.waiters[vm.Name], ev)
	l.names[vm.Name] = true
	l.mu.Unlock()
	defer func() {
		l.mu.Lock()
		delete(l.waiters, vm.Name)
		l.mu.Unlock()
		l.Destroy(vm.Name)
	}()
	start := time.Now()
	// Autodestroy: libvirtd kills the guest if this process dies first.
	dom, err := l.conn.DomainCreateXML(x, libvirt.DOMAIN_START_AUTODESTROY)
	if err != nil {
		return nil, fmt.Errorf("start domain %s: %w", vm.Name, err)
	}
	dom.Free()
	if running != nil {
		running()
	}
	res := &Result{Name: vm.Name, Nonce: vm.Nonce}
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	stopped := false
	for {
		if res.BootTime == 0 {
			if line := findLine(vm.Console, guestimage.Marker+" nonce="+vm.Nonce); line != "" {
				res.BootTime = time.Since(start)
				res.Bytes = parseBytes(line)
			}
		}
		if stopped {
			res.Console, _ = readFile(vm.Console)
			if res.BootTime == 0 {
				return res, fmt.Errorf("domain %s stopped without printing %s; console:\n%s", vm.Name, guestimage.Marker, tail(res.Console, 30))
			}
			return res, nil
		}
		select {
		case <-ctx.Done():
			c, _ := readFile(vm.Console)
			return res, fmt.Errorf("domain %s: %w before it finished (marker seen: %v); console:\n%s", vm.Name, ctx.Err(), res.BootTime != 0, tail(c, 30))
		case e := <-ev:
			if e == libvirt.DOMAIN_EVENT_STOPPED || e == libvirt.DOMAIN_EVENT_SHUTDOWN || e == libvirt.DOMAIN_EVENT_CRASHED {
				res.StopTime = time.Since(start)
				stopped = true
			}
		case <-tick.C:
			// A missed event must not hang the wait: poll the state too.
			if d, err := l.conn.LookupDomainByName(vm.Name); err != nil {
				if res.StopTime == 0 {
					res.StopTime = time.Since(start)
				}
				stopped = true
			} else {
				d.Free()
			}
		}
	}
}

func readFile(p string) (string, error) {
	b, err := os.ReadFile(p)
	return string(b), err
}

func findLine(path, prefix string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if i := strings.Index(s.Text(), prefix); i >= 0 {
			return s.Text()[i:]
		}
	}
	return ""
}

func parseBytes(line string) int64 {
	for _, f := range strings.Fields(line) {
		if v, ok := strings.CutPrefix(f, "bytes="); ok {
			n, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			return n
		}
	}
	return 0
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// NewISCSIOverlay makes a qcow2 file whose backing is the LUN, so a
// baseline guest boots straight from the target without writing it.
func NewISCSIOverlay(path, host string, port int, iqn string, lun int, size int64) error {
	backing := fmt.Sprintf("iscsi://%s:%d/%s/%d", host, port, iqn, lun)
	// -u: do not open the backing now (that would be a login and reads
	// the measurement would count); the size is given instead.
	out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", backing, path, strconv.FormatInt(size, 10)).CombinedOutput()
	if err != nil {
		return fmt.Errorf("qemu-img create overlay on %s: %v: %s", backing, err, out)
	}
	return os.Chmod(path, 0o666)
}
