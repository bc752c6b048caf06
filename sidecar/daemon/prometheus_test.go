package daemon

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
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

// prometheus is a real Prometheus (Debian's prometheus package) scraping
// targets every second.
type promServer struct {
	t    *testing.T
	base string // http://127.0.0.1:PORT
	dir  string
	hc   *http.Client
}

func startPrometheus(t *testing.T, targets ...string) *promServer {
	t.Helper()
	dir := t.TempDir()
	conf := filepath.Join(dir, "prometheus.yml")
	quoted := make([]string, len(targets))
	for i, tg := range targets {
		quoted[i] = strconv.Quote(tg)
	}
	os.WriteFile(conf, []byte(fmt.Sprintf(`global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: vmthunder
    static_configs:
      - targets: [%s]
`, strings.Join(quoted, ", "))), 0o644)
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
	return &promServer{t: t, base: fmt.Sprintf("http://127.0.0.1:%d", port), dir: dir, hc: &http.Client{Timeout: 5 * time.Second}}
}

func (p *promServer) log() string {
	b, _ := os.ReadFile(filepath.Join(p.dir, "prometheus.log"))
	return string(b)
}

// sample is one series of an instant query's answer.
type sample struct {
	Metric map[string]string
	Value  float64
}

// get asks the HTTP API path (with query parameters q) and decodes data.
func (p *promServer) get(path string, q url.Values, data any) error {
	resp, err := p.hc.Get(p.base + path + "?" + q.Encode())
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var r struct {
		Status string
		Error  string
		Data   json.RawMessage
	}
	if err := json.Unmarshal(b, &r); err != nil {
		return fmt.Errorf("%s: %v: %.200s", path, err, b)
	}
	if r.Status != "success" {
		return fmt.Errorf("%s: %s: %s", path, r.Status, r.Error)
	}
	return json.Unmarshal(r.Data, data)
}

// query runs an instant PromQL query.
func (p *promServer) query(expr string) ([]sample, error) {
	var d struct {
		ResultType string
		Result     []struct {
			Metric map[string]string
			Value  [2]any
		}
	}
	if err := p.get("/api/v1/query", url.Values{"query": {expr}}, &d); err != nil {
		return nil, err
	}
	if d.ResultType != "vector" {
		return nil, fmt.Errorf("result of type %s", d.ResultType)
	}
	out := make([]sample, len(d.Result))
	for i, r := range d.Result {
		v, err := strconv.ParseFloat(fmt.Sprint(r.Value[1]), 64)
		if err != nil {
			return nil, fmt.Errorf("value %v: %v", r.Value[1], err)
		}
		out[i] = sample{r.Metric, v}
	}
	return out, nil
}

// until polls ok every half second for up to d; it returns ok's last error.
func until(d time.Duration, ok func() error) error {
	deadline := time.Now().Add(d)
	for {
		err := ok()
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(500 * time.Millisecond)
	}
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
	prom := startPrometheus(t, e.d.MetricsAddr())
	q := `vmthunder_read_bytes_total{source="origin"}`
	err = until(30*time.Second, func() error {
		r, err := prom.query(q)
		switch {
		case err != nil:
			return err
		case len(r) == 0:
			return fmt.Errorf("no series")
		case r[0].Metric["base"] != x.Base || r[0].Metric["job"] != "vmthunder" || r[0].Value != float64(len(data)):
			t.Fatalf("query %s: %+v", q, r)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("no %s from Prometheus within 30 s: %v\nprometheus log:\n%s", q, err, prom.log())
	}
}

// dashboardTarget is one query of one panel of the Grafana dashboard.
type dashboardTarget struct{ panel, refID, expr string }

// dashboard reads the Grafana dashboard's template variables and every
// panel's queries, rows' panels included.
func dashboard(t *testing.T) (vars []map[string]any, targets []dashboardTarget) {
	t.Helper()
	raw, err := os.ReadFile("../../contrib/grafana/vmthunder.json")
	if err != nil {
		t.Fatal(err)
	}
	type panel struct {
		Title   string
		Type    string
		Panels  []json.RawMessage
		Targets []struct{ RefID, Expr string }
	}
	var d struct {
		Templating struct{ List []map[string]any }
		Panels     []json.RawMessage
	}
	if err := json.Unmarshal(raw, &d); err != nil {
		t.Fatal(err)
	}
	var walk func([]json.RawMessage)
	walk = func(ps []json.RawMessage) {
		for _, r := range ps {
			var p panel
			if err := json.Unmarshal(r, &p); err != nil {
				t.Fatal(err)
			}
			if p.Type != "row" && len(p.Targets) == 0 {
				t.Errorf("panel %q has no query", p.Title)
			}
			for _, tg := range p.Targets {
				targets = append(targets, dashboardTarget{p.Title, tg.RefID, tg.Expr})
			}
			walk(p.Panels)
		}
	}
	walk(d.Panels)
	return d.Templating.List, targets
}

var labelValues = regexp.MustCompile(`^label_values\((.+),\s*([a-zA-Z_][a-zA-Z0-9_]*)\)$`)

// Three daemons with peers boot one template at once while a real
// Prometheus scrapes them; then every query of every panel of the Grafana
// dashboard, with its template variables set as Grafana would ("All"),
// returns at least one series, and each template variable has values.
func TestDashboardPanelsReturnSeries(t *testing.T) {
	const size = 8 << 20
	content := make([]byte, size)
	rand.Read(content)
	envs, base := peerEnvs(t, 3, content, func(c *config.Config) { c.MetricsListen = "127.0.0.1:0" })
	var targets []string
	for _, e := range envs {
		targets = append(targets, e.d.MetricsAddr())
	}
	prom := startPrometheus(t, targets...)
	if err := until(30*time.Second, func() error {
		r, err := prom.query(`sum(vmthunder_up)`)
		if err == nil && (len(r) != 1 || r[0].Value != 3) {
			err = fmt.Errorf("up: %+v", r)
		}
		return err
	}); err != nil {
		t.Fatalf("Prometheus does not see the 3 daemons: %v\n%s", err, prom.log())
	}

	// The wave, and the events the other panels show: a failed request,
	// a copy-on-write export written to, a warm-up.
	got := readAll(t, envs)
	for i := range got {
		if !bytes.Equal(got[i], content) {
			t.Fatalf("node%d read wrong bytes", i)
		}
	}
	e0 := envs[0]
	e0.d.mu.Lock()
	top := e0.d.exports["vm"].top
	e0.d.mu.Unlock()
	if _, err := top.ReadAt(make([]byte, 512), top.Size()); err == nil {
		t.Fatal("read past the end succeeded")
	}
	img, _ := e0.image("vol.raw", 1<<20)
	x, err := e0.c.Create(ctx(t), api.CreateRequest{ID: "vm-cow", Origin: img, Mode: api.ModeCOW})
	if err != nil {
		t.Fatal(err)
	}
	qemuIO(t, x.URI, "write 0 65536", "flush")
	if _, err := e0.c.Warm(ctx(t), x.Base, nil); err != nil {
		t.Fatal(err)
	}

	vars, panels := dashboard(t)
	// Grafana's "All" of a multi-value variable is its allValue.
	subst := map[string]string{"$__rate_interval": "1m"}
	for _, v := range vars {
		name, _ := v["name"].(string)
		if v["type"] != "query" {
			continue
		}
		all, _ := v["allValue"].(string)
		if all == "" {
			t.Fatalf("template variable %s has no allValue", name)
		}
		subst["$"+name] = all
	}
	expand := func(s string) string {
		for k, v := range subst {
			s = strings.ReplaceAll(s, k, v)
		}
		return s
	}
	for _, v := range vars {
		if v["type"] != "query" {
			continue
		}
		q, _ := v["query"].(string)
		m := labelValues.FindStringSubmatch(q)
		if m == nil {
			t.Fatalf("template variable %s: query %q is not label_values(series, label)", v["name"], q)
		}
		var values []string
		err := until(30*time.Second, func() error {
			if err := prom.get("/api/v1/label/"+m[2]+"/values", url.Values{"match[]": {expand(m[1])}}, &values); err != nil {
				return err
			}
			if len(values) == 0 {
				return fmt.Errorf("no values")
			}
			return nil
		})
		if err != nil {
			t.Errorf("template variable %s (%s): %v", v["name"], q, err)
		}
		t.Logf("$%s: %v", v["name"], values)
	}

	// Every query of every panel.
	missing := map[dashboardTarget]string{}
	for _, p := range panels {
		missing[p] = "not asked"
	}
	err = until(60*time.Second, func() error {
		for p := range missing {
			r, err := prom.query(expand(p.expr))
			switch {
			case err != nil:
				missing[p] = err.Error()
			case len(r) == 0:
				missing[p] = "no series"
			default:
				delete(missing, p)
			}
		}
		if len(missing) > 0 {
			return fmt.Errorf("%d queries without series", len(missing))
		}
		return nil
	})
	for p, why := range missing {
		t.Errorf("panel %q query %s: %s\n  %s", p.panel, p.refID, why, expand(p.expr))
	}
	if err != nil {
		t.Fatalf("%v\nprometheus log:\n%s", err, prom.log())
	}
	t.Logf("%d queries of the dashboard's panels answered with series", len(panels))

	// The peers row shows the wave: the origins sent at least one copy and
	// less than one per node (about one, unless a fetch timed out on a
	// very busy machine), the rest came from peers and is what each member
	// received; fetches were timed; 3 members alive.
	// (Asked, in this order, until the scrapes after the wave's last byte
	// are in.)
	// A hedged chunk's slower answer is verified and counted as read from
	// peers too (and as waste): without the waste, origin and peers add up
	// to the three copies exactly.
	var fromPeers, waste float64
	checks := []struct {
		q  string
		ok func([]sample) bool
	}{
		{`sum(vmthunder_peer_read_bytes_total{source="peers"})`, func(r []sample) bool {
			fromPeers = r[0].Value
			return fromPeers > 0
		}},
		{`sum(vmthunder_peer_hedge_waste_bytes_total)`, func(r []sample) bool {
			waste = r[0].Value
			return waste >= 0 && waste < fromPeers
		}},
		{`sum(vmthunder_peer_read_bytes_total{source="origin",base="` + base + `"})`, func(r []sample) bool {
			return r[0].Value >= size && r[0].Value < 3*size && r[0].Value+fromPeers-waste == 3*size
		}},
		{`sum by (direction) (vmthunder_peer_member_bytes_total)`, func(r []sample) bool {
			by := map[string]float64{}
			for _, s := range r {
				by[s.Metric["direction"]] = s.Value
			}
			return len(r) == 2 && by["received"] == fromPeers && by["served"] >= by["received"]
		}},
		{`histogram_quantile(0.5, sum by (le) (vmthunder_peer_fetch_duration_seconds_bucket{outcome="ok"}))`, func(r []sample) bool {
			return r[0].Value > 0 && r[0].Value <= 5 && !math.IsNaN(r[0].Value)
		}},
		{`max by (state) (vmthunder_peer_members{state="alive"})`, func(r []sample) bool { return r[0].Value == 3 }},
	}
	answers := make([][]sample, len(checks))
	err = until(20*time.Second, func() error {
		for i, c := range checks {
			r, err := prom.query(c.q)
			if err != nil {
				return err
			}
			if answers[i] = r; len(r) == 0 || !c.ok(r) {
				return fmt.Errorf("%s: %+v", c.q, r)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("the peers row does not show the wave: %v", err)
	}
	for i, c := range checks {
		t.Logf("%s = %+v", c.q, answers[i])
	}

	// GET /v1/peers says the same per member: all alive, bytes from each
	// adding up to what the node read from peers.
	for i, e := range envs {
		v, err := e.c.Peers(ctx(t))
		if err != nil {
			t.Fatal(err)
		}
		b, _ := e.d.Base(base)
		var received uint64
		for _, m := range v.Members {
			if m.State != "alive" || m.Since.IsZero() || len(m.Bases) != 1 || m.Bases[0] != base || m.Self != (m.Name == v.Self) {
				t.Errorf("node%d: member %+v", i, m)
			}
			received += m.ReceivedBytes
		}
		if len(v.Members) != 3 || received != b.Peers.FromPeersBytes || received == 0 {
			t.Errorf("node%d: %d members, %d bytes received from them, %d from peers", i, len(v.Members), received, b.Peers.FromPeersBytes)
		}
	}
}
