package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/vmthunder/vmthunder/sidecar/api/client"
)

// ExportStats are an export's counters as the sidecar reports them.
type ExportStats struct {
	ReadBytes     int64 `json:"read_bytes"`
	WriteBytes    int64 `json:"write_bytes"`
	CacheHitBytes int64 `json:"cache_hit_bytes"`
	OriginBytes   int64 `json:"origin_bytes"`
}

// Export is one export as the sidecar describes it (docs/api.md).
type Export struct {
	ID         string      `json:"id"`
	Mode       string      `json:"mode"`
	Base       string      `json:"base"`
	Size       int64       `json:"size"`
	Socket     string      `json:"socket"`
	ExportName string      `json:"export_name"`
	CowPath    string      `json:"cow_path"`
	Stats      ExportStats `json:"stats"`
}

// Disk is the libvirt disk for this export.
func (e *Export) Disk() Disk { return Disk{NBDSocket: e.Socket, NBDExport: e.ExportName} }

// Daemon is a `vmthunder daemon` process this harness started, with its
// own config, sockets, cache and COW directories under Dir.
type Daemon struct {
	Dir     string
	API     string // API socket
	bin     string
	config  string
	command Command
	env     []string
	log     string
	api     *client.Client
	mu      sync.Mutex
	cmd     *exec.Cmd
	done    chan struct{}
	started int
}

// DaemonOptions configure a daemon.
type DaemonOptions struct {
	ChunkSize string   // cache chunk size, e.g. "256K"; empty: the daemon's default
	Sections  string   // more config sections, after [cache] (e.g. [peers])
	Command   Command  // runs the daemon (nil: exec.Command), e.g. in a network namespace
	Env       []string // more environment for the daemon
}

// StartDaemon writes a config into dir and starts the daemon on it.
func StartDaemon(bin, dir string, o DaemonOptions) (*Daemon, error) {
	if err := MakeShared(dir); err != nil {
		return nil, err
	}
	for _, d := range []string{"nbd", "cache", "state"} {
		if err := MakeShared(filepath.Join(dir, d)); err != nil {
			return nil, err
		}
	}
	d := &Daemon{Dir: dir, API: filepath.Join(dir, "api.sock"), bin: bin,
		config: filepath.Join(dir, "vmthunder.conf"), log: filepath.Join(dir, "daemon.log"),
		command: o.Command.orExec(), env: o.Env}
	chunk := ""
	if o.ChunkSize != "" {
		chunk = "chunk_size = " + o.ChunkSize + "\n"
	}
	// The keys of sidecar/config.
	conf := fmt.Sprintf(`[DEFAULT]
state_dir = %s
api_socket = %s
nbd_socket_dir = %s
nbd_group = libvirt-qemu
log_level = info

[cache]
dir = %s
%s`, filepath.Join(dir, "state"), d.API, filepath.Join(dir, "nbd"), filepath.Join(dir, "cache"), chunk)
	if o.Sections != "" {
		conf += "\n" + o.Sections
	}
	if err := os.WriteFile(d.config, []byte(conf), 0o644); err != nil {
		return nil, err
	}
	d.api = client.New(d.API)
	return d, d.Start()
}

// Start (re)starts the daemon on the same config: the same cache, COW
// stores and sockets.
func (d *Daemon) Start() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	logf, err := os.OpenFile(d.log, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	cmd := d.command(d.bin, "daemon", "--config", d.config)
	if len(d.env) > 0 {
		cmd.Env = append(os.Environ(), d.env...)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start daemon: %w", err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); logf.Close(); close(done) }()
	d.cmd, d.done = cmd, done
	d.started++
	deadline := time.Now().Add(60 * time.Second)
	for {
		select {
		case <-done:
			return fmt.Errorf("daemon exited at start; log:\n%s", d.LogTail(20))
		default:
		}
		var h struct{ Status string }
		if err := d.call("GET", "/v1/health", nil, &h); err == nil && h.Status == "ok" {
			return nil
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			<-done
			return fmt.Errorf("daemon API %s not healthy after 60 s; log:\n%s", d.API, d.LogTail(20))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// LogTail is the end of the daemon's log.
func (d *Daemon) LogTail(n int) string {
	b, _ := os.ReadFile(d.log)
	return tail(string(b), n)
}

// Log is the daemon's whole log.
func (d *Daemon) Log() string {
	b, _ := os.ReadFile(d.log)
	return string(b)
}

// Pid is the daemon's process id, 0 when it is not running.
func (d *Daemon) Pid() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cmd == nil {
		return 0
	}
	return d.cmd.Process.Pid
}

// Kill ends the daemon at once (SIGKILL), as a crash would.
func (d *Daemon) Kill() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cmd == nil {
		return
	}
	d.cmd.Process.Kill()
	<-d.done
	d.cmd = nil
}

// Stop stops the daemon with SIGTERM and waits for it.
func (d *Daemon) Stop() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cmd == nil {
		return nil
	}
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
	case <-time.After(30 * time.Second):
		d.cmd.Process.Kill()
		<-d.done
		d.cmd = nil
		return fmt.Errorf("daemon did not stop within 30 s of SIGTERM")
	}
	st := d.cmd.ProcessState
	d.cmd = nil
	if !st.Success() {
		return fmt.Errorf("daemon exited with %v; log:\n%s", st, d.LogTail(20))
	}
	return nil
}

// Restart stops the daemon and starts it again on the same state.
func (d *Daemon) Restart() error {
	if err := d.Stop(); err != nil {
		return err
	}
	return d.Start()
}

// Close stops the daemon; it is safe to call twice.
func (d *Daemon) Close() { d.Stop() }

func (d *Daemon) call(method, path string, in, out any) error {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := d.api.Do(ctx, method, path, in, out); err != nil {
		return fmt.Errorf("%s %s: %w", method, path, err)
	}
	return nil
}

// CreateExport asks for an export: mode "cow", "write-through" or
// "readonly"; base and generation name a template ("" for the origin
// volume's own base).
func (d *Daemon) CreateExport(id, origin, base, generation, mode string) (*Export, error) {
	req := map[string]any{"id": id, "origin": origin, "mode": mode}
	if base != "" {
		req["base"], req["generation"] = base, generation
	}
	var e Export
	if err := d.call("POST", "/v1/exports", req, &e); err != nil {
		return nil, err
	}
	if err := shareSocket(e.Socket); err != nil {
		return nil, fmt.Errorf("export %s socket %s: %w", id, e.Socket, err)
	}
	return &e, nil
}

// GetExport is one export with its counters.
func (d *Daemon) GetExport(id string) (*Export, error) {
	var e Export
	return &e, d.call("GET", "/v1/exports/"+id, nil, &e)
}

// DeleteExport removes an export.
func (d *Daemon) DeleteExport(id string) error {
	return d.call("DELETE", "/v1/exports/"+id, nil, nil)
}

// Stats is the node's /v1/stats, as a free-form map (its fields are the
// daemon's to choose).
func (d *Daemon) Stats() (map[string]any, error) {
	var m map[string]any
	return m, d.call("GET", "/v1/stats", nil, &m)
}
