package main

import (
	"encoding/json"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmthunder/vmthunder/sidecar/api"
)

// A warm-up that outlasts the per-call timeout is still running, not
// failed: `vmthunder warm` must wait it out and exit 0 when it is done.
func TestWarmOutlastsCallTimeout(t *testing.T) {
	dir, err := os.MkdirTemp("", "vmtw-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "api.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	var polls atomic.Int32
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		st := &api.WarmStatus{State: api.WarmRunning, TotalBytes: 100}
		if r.Method == http.MethodGet {
			polls.Add(1)
			if time.Since(start) > 1200*time.Millisecond {
				st.State, st.DoneBytes = api.WarmDone, 100
			}
			json.NewEncoder(w).Encode(api.Base{ID: "b", Warm: st})
			return
		}
		json.NewEncoder(w).Encode(st)
	})}
	go srv.Serve(ln)
	defer srv.Close()

	oldSock, oldTimeout := apiSocket, cliTimeout
	apiSocket, cliTimeout = sock, 500*time.Millisecond
	defer func() { apiSocket, cliTimeout = oldSock, oldTimeout }()
	if err := runWarm([]string{"-q", "b"}); err != nil {
		t.Fatalf("warm-up longer than one call's timeout: %v (after %d polls)", err, polls.Load())
	}
}
