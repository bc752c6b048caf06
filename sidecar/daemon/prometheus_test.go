package daemon

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/vmthunder/vmthunder/sidecar/api"
	"github.com/vmthunder/vmthunder/sidecar/config"
)

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// A real Prometheus scrapes the daemon and answers a query for one of its
// series.
func TestPrometheusScrape(t *testing.T) {
	e := newEnv(t, func(c *config.Config) { c.MetricsListen = "127.0.0.1:0" })
	img, data := e.image("a.raw", 1<<20)
	x, err := e.c.Create(ctx(t), api.CreateRequest{ID: "vm1", Origin: img, Mode: api.ModeCOW})
	if err != nil {
		t.Fatal(err)
	}
	nbdRead(t, x.URI)

	dir := t.TempDir()
	conf := filepath.Join(dir, "prometheus.yml")
	os.WriteFile(conf, []byte(fmt.Sprintf(`global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: vmthunder
    static_configs:
      - targets: ["%s"]
`, e.d.MetricsAddr())), 0o644)
	port := freePort(t)
	cmd := exec.Command("prometheus", "--config.file="+conf, "--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address=127.0.0.1:"+strconv.Itoa(port), "--log.level=warn")
	logf, _ := os.Create(filepath.Join(dir, "prometheus.log"))
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait(); logf.Close() })

	q := `vmthunder_read_bytes_total{source="origin"}`
	u := fmt.Sprintf("http://127.0.0.1:%d/api/v1/query?query=%s", port, url.QueryEscape(q))
	hc := &http.Client{Timeout: 2 * time.Second}
	deadline := time.Now().Add(30 * time.Second)
	var last string
	for time.Now().Before(deadline) {
		time.Sleep(500 * time.Millisecond)
		resp, err := hc.Get(u)
		if err != nil {
			last = err.Error()
			continue
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		last = string(b)
		var r struct {
			Status string
			Data   struct {
				Result []struct {
					Metric map[string]string
					Value  [2]any
				}
			}
		}
		if json.Unmarshal(b, &r) != nil || r.Status != "success" || len(r.Data.Result) == 0 {
			continue
		}
		res := r.Data.Result[0]
		v, _ := strconv.ParseFloat(fmt.Sprint(res.Value[1]), 64)
		if res.Metric["base"] != x.Base || res.Metric["job"] != "vmthunder" || v != float64(len(data)) {
			t.Fatalf("query %s: %s", q, b)
		}
		return
	}
	log, _ := os.ReadFile(filepath.Join(dir, "prometheus.log"))
	t.Fatalf("no %s from Prometheus within 30 s; last answer %s\nprometheus log:\n%s", q, last, log)
}
