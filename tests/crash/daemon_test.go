package crash

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vmthunder/vmthunder/internal/testbin"
	"github.com/vmthunder/vmthunder/sidecar/api"
	"github.com/vmthunder/vmthunder/sidecar/api/client"
)

type daemonProc struct {
	t    *testing.T
	dir  string
	conf string
	cmd  *exec.Cmd
	log  *os.File
	c    *client.Client
}

func startDaemon(t *testing.T, p *daemonProc) {
	t.Helper()
	p.cmd = exec.Command(testbin.VmthunderT(t), "daemon", "--config", p.conf)
	p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := p.c.Health(ctx)
		cancel()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon did not come up: %v", err)
		}
	}
}

// A daemon killed with SIGKILL while creates are under way leaves, after
// its restart, exactly what its table owns: no socket file and no COW
// store of an export it does not have (a later create with that id would
// otherwise adopt the orphan store), and every export it has is served.
func TestKillDuringCreates(t *testing.T) {
	dir, err := os.MkdirTemp("", "vmtk-") // short: socket paths <= 107 bytes
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	img := filepath.Join(dir, "img", "base.img")
	os.MkdirAll(filepath.Dir(img), 0o755)
	if err := os.WriteFile(img, make([]byte, 4<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	p := &daemonProc{t: t, dir: dir, conf: filepath.Join(dir, "vmthunder.conf"),
		c: client.New(filepath.Join(dir, "api.sock"))}
	conf := fmt.Sprintf("[DEFAULT]\nstate_dir = %s\napi_socket = %s\nnbd_socket_dir = %s\nallowed_origin_dirs = %s\n[cache]\ndir = %s\n",
		filepath.Join(dir, "state"), filepath.Join(dir, "api.sock"), filepath.Join(dir, "nbd"), filepath.Dir(img), filepath.Join(dir, "cache"))
	os.WriteFile(p.conf, []byte(conf), 0o600)
	if p.log, err = os.Create(filepath.Join(dir, "daemon.log")); err != nil {
		t.Fatal(err)
	}
	defer p.log.Close()

	const n = 32
	for round := 0; round < 4; round++ {
		startDaemon(t, p)
		var wg sync.WaitGroup
		for i := 0; i < n; i++ {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				if _, err := p.c.Create(ctx, api.CreateRequest{ID: fmt.Sprintf("r%d-vm%d", round, i), Origin: img, Mode: api.ModeCOW}); err != nil && i == 0 {
					t.Logf("round %d: create: %v", round, err)
				}
			}(i)
		}
		time.Sleep([]time.Duration{10, 30, 80, 200}[round] * time.Millisecond)
		p.cmd.Process.Signal(syscall.SIGKILL)
		p.cmd.Wait()
		wg.Wait()

		startDaemon(t, p)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		list, err := p.c.List(ctx)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		owned := map[string]bool{}
		for _, x := range list {
			if x.State != api.StateReady {
				t.Errorf("round %d: export %s is %s after restart: %s", round, x.ID, x.State, x.Error)
			}
			owned[x.ID] = true
		}
		socks, _ := filepath.Glob(filepath.Join(dir, "nbd", "*.sock"))
		for _, s := range socks {
			if id := strings.TrimSuffix(filepath.Base(s), ".sock"); !owned[id] {
				t.Errorf("round %d: socket %s has no export", round, s)
			}
		}
		stores, _ := filepath.Glob(filepath.Join(dir, "state", "cow", "*"))
		for _, s := range stores {
			id := strings.TrimSuffix(strings.TrimSuffix(filepath.Base(s), ".bitmap"), ".img")
			if !owned[id] {
				t.Errorf("round %d: cow store %s has no export", round, s)
			}
		}
		t.Logf("round %d: %d of %d creates survived; %d sockets, %d store files", round, len(owned), n, len(socks), len(stores))
		p.cmd.Process.Signal(syscall.SIGTERM)
		if err := p.cmd.Wait(); err != nil && !errors.Is(err, os.ErrProcessDone) {
			t.Logf("daemon exit: %v", err)
		}
	}
}
