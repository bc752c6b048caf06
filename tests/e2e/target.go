package e2e

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vmthunder/vmthunder/internal/testbin"
)

// Command makes the command to run a program: exec.Command, or one that
// runs it elsewhere (`ip netns exec` in tests/bulk).
type Command func(name string, args ...string) *exec.Cmd

func (c Command) orExec() Command {
	if c == nil {
		return exec.Command
	}
	return c
}

// Target is a private tgtd serving a file as one LUN. It is run by tgtup
// (package sidecar/internal/tgt, which tests outside sidecar/ may not
// import) as a child process, which removes the target when its stdin
// closes.
type Target struct {
	IQN    string
	LUN    int
	Portal string // the target's own portal, host:port
	File   string // the LUN's backing file

	cmd   *exec.Cmd
	stdin io.WriteCloser
	done  chan struct{}
}

// StartTarget serves a sparse copy of image (so guests' write-through
// writes never touch the original), made in dir, from a tgtd that command
// (nil: exec.Command) runs.
func StartTarget(image, dir string, command Command) (*Target, error) {
	tgtup, err := testbin.Build("./sidecar/internal/tgt/tgtup")
	if err != nil {
		return nil, err
	}
	file := filepath.Join(dir, "lun.img")
	if out, err := exec.Command("cp", "--sparse=always", image, file).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("copy image for the LUN: %v: %s", err, out)
	}
	t := &Target{File: file, done: make(chan struct{})}
	t.cmd = command.orExec()(tgtup, "-file", file, "-dir", dir, "-stdin")
	t.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	var stderr bytes.Buffer
	t.cmd.Stderr = &stderr
	stdout, err := t.cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if t.stdin, err = t.cmd.StdinPipe(); err != nil {
		return nil, err
	}
	if err := t.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start tgtup: %w", err)
	}
	go func() { t.cmd.Wait(); close(t.done) }()
	// tgtup prints shell assignments, TGT_READY=1 last.
	vars := map[string]string{}
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok {
			vars[k] = strings.Trim(v, "'")
			if k == "TGT_READY" {
				break
			}
		}
	}
	if vars["TGT_READY"] != "1" {
		t.stdin.Close()
		<-t.done
		return nil, fmt.Errorf("tgtup did not start a target: %s", stderr.String())
	}
	go io.Copy(io.Discard, stdout)
	t.IQN = vars["TGT_IQN"]
	t.LUN, _ = strconv.Atoi(vars["TGT_LUN"])
	t.Portal = strings.Fields(vars["TGT_PORTALS"])[0]
	return t, nil
}

// Stop removes the target: tgtup's stdin closes, and it is killed if it
// has not finished 15 s later.
func (t *Target) Stop() {
	t.stdin.Close()
	select {
	case <-t.done:
	case <-time.After(15 * time.Second):
		t.cmd.Process.Kill()
		<-t.done
	}
}
