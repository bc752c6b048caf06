package daemon

import (
	"crypto/rand"
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/vmthunder/vmthunder/sidecar/api"
)

// Every series the Grafana dashboard and the docs name is one the daemon
// exports (with peers enabled for the peer series). Whether each panel's
// query returns series is TestDashboardPanelsReturnSeries'.
func TestDashboardSeriesExist(t *testing.T) {
	e := newEnv(t, nil)
	img, _ := e.image("a.raw", 1<<20)
	x, err := e.c.Create(ctx(t), api.CreateRequest{ID: "vm1", Origin: img, Mode: api.ModeCOW})
	if err != nil {
		t.Fatal(err)
	}
	nbdRead(t, x.URI)
	qemuIO(t, x.URI, "write 0 4096", "flush")
	// One failed request, so the error series has a child.
	e.d.mu.Lock()
	top := e.d.exports["vm1"].top
	e.d.mu.Unlock()
	if _, err := top.ReadAt(make([]byte, 512), top.Size()); err == nil {
		t.Fatal("read past the end succeeded")
	}
	if _, err := e.c.Warm(ctx(t), x.Base, nil); err != nil {
		t.Fatal(err)
	}
	// Two nodes with peers read a template: the peer series.
	content := make([]byte, 1<<20)
	rand.Read(content)
	peerNodes, _ := peerEnvs(t, 2, content)
	readAll(t, peerNodes)
	have := map[string]bool{}
	for _, d := range []*Daemon{e.d, peerNodes[0].d, peerNodes[1].d} {
		mfs, err := d.Registry().Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, mf := range mfs {
			have[mf.GetName()] = true
		}
	}
	re := regexp.MustCompile(`vmthunder_[a-z_]+`)
	for _, f := range []string{"../../contrib/grafana/vmthunder.json", "../../docs/api.md"} {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, name := range re.FindAllString(string(b), -1) {
			if name == "vmthunder_brick" || name == "vmthunder_nova" { // the shims' Python packages
				continue
			}
			if templateMetadata[name] { // a template volume's Cinder metadata keys, not series
				continue
			}
			base := strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(name, "_bucket"), "_sum"), "_count")
			if !have[base] {
				t.Errorf("%s names %s, which the daemon does not export", f, name)
			}
		}
	}
}

var templateMetadata = map[string]bool{"vmthunder_template": true, "vmthunder_generation": true, "vmthunder_image_id": true,
	"vmthunder_image_checksum": true, "vmthunder_chunk_size": true, "vmthunder_size": true,
	"vmthunder_manifest_root": true, "vmthunder_manifest_volume": true, "vmthunder_manifest_of": true}
