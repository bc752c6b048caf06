// Package openstacktest starts real OpenStack services for tests: the
// one-node Cinder 29 + Glance 33 of tests/openstack (noauth), and a
// Keystone 30 (sqlite, fernet tokens) whose catalog points at that Cinder.
// Both run from the test venv ($VMTHUNDER_PYTHON, default .venv/bin/python
// at the repository root; $VMTHUNDER_KEYSTONE_PYTHON for Keystone when it
// lives elsewhere) and are stopped when the test ends.
package openstacktest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Cloud is what `python -m tests.openstack.cinder up` prints.
type Cloud struct {
	Endpoint           string `json:"endpoint"` // http://HOST:PORT/v3/PROJECT
	ProjectID          string `json:"project_id"`
	TemplateVolumeType string `json:"template_volume_type"`
	Workdir            string `json:"workdir"`
	GlanceEndpoint     string `json:"glance_endpoint"`
}

// Root is the repository's root directory.
func Root() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", "..", ".."))
}

// Python is the test venv's interpreter.
func Python() string {
	if py := os.Getenv("VMTHUNDER_PYTHON"); py != "" {
		return py
	}
	return filepath.Join(Root(), ".venv", "bin", "python")
}

// StartCinder starts the harness (about 10 s on an idle machine) and stops
// it when the test ends; $VMTHUNDER_CINDER_INFO (the JSON line `up`
// printed) names one already running instead.
func StartCinder(t testing.TB) *Cloud {
	t.Helper()
	if info := os.Getenv("VMTHUNDER_CINDER_INFO"); info != "" {
		var c Cloud
		if err := json.Unmarshal([]byte(info), &c); err != nil {
			t.Fatalf("VMTHUNDER_CINDER_INFO: %v", err)
		}
		return &c
	}
	py := Python()
	work, err := os.MkdirTemp("", "vmt-cinder-")
	if err != nil {
		t.Fatal(err)
	}
	os.Remove(work) // the harness makes it
	cmd := exec.Command(py, "-m", "tests.openstack.cinder", "up", "--workdir", work)
	cmd.Dir = Root()
	var so, se bytes.Buffer
	cmd.Stdout, cmd.Stderr = &so, &se
	if err := cmd.Run(); err != nil {
		t.Fatalf("starting the Cinder harness (%s -m tests.openstack.cinder up; make venv and scripts/install-deps.sh install it): %v\n%s", py, err, se.String())
	}
	t.Cleanup(func() {
		down := exec.Command(py, "-m", "tests.openstack.cinder", "down", "--workdir", work)
		down.Dir = Root()
		if b, err := down.CombinedOutput(); err != nil {
			t.Errorf("stopping the Cinder harness: %v\n%s", err, b)
		}
	})
	lines := strings.Split(strings.TrimSpace(so.String()), "\n")
	var c Cloud
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), &c); err != nil {
		t.Fatalf("harness answer %q: %v", so.String(), err)
	}
	return &c
}

// Keystone is a running Keystone with an admin user, a region, and a
// block-storage endpoint in its catalog.
type Keystone struct {
	AuthURL   string // http://127.0.0.1:PORT/v3
	Username  string // admin, in domain Default
	Password  string
	Project   string // admin, in domain Default
	Region    string
	AppCredID string // an application credential of the admin user
	AppSecret string
}

// StartKeystone starts Keystone 30 (sqlite, fernet tokens, served by
// wsgiref) whose catalog lists blockStorage (a project-less Cinder v3 URL)
// in region RegionOne, and stops it when the test ends.
func StartKeystone(t testing.TB, blockStorage string) *Keystone {
	t.Helper()
	py := os.Getenv("VMTHUNDER_KEYSTONE_PYTHON")
	if py == "" {
		py = Python()
	}
	dir := t.TempDir()
	port := freePort(t)
	k := &Keystone{AuthURL: fmt.Sprintf("http://127.0.0.1:%d/v3", port), Username: "admin", Password: "ks-pass-4711",
		Project: "admin", Region: "RegionOne"}
	conf := filepath.Join(dir, "keystone.conf")
	body := fmt.Sprintf(`[DEFAULT]
log_file = %[1]s/keystone.log
[database]
connection = sqlite:///%[1]s/keystone.db
[token]
provider = fernet
[fernet_tokens]
key_repository = %[1]s/fernet-keys
[fernet_receipts]
key_repository = %[1]s/fernet-receipts
[credential]
key_repository = %[1]s/credential-keys
`, dir)
	if err := os.WriteFile(conf, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	manage := func(args ...string) {
		t.Helper()
		a := append([]string{"-c", "import sys; from keystone.cmd.manage import main; sys.argv[0] = 'keystone-manage'; main()", "--config-file", conf}, args...)
		if b, err := exec.Command(py, a...).CombinedOutput(); err != nil {
			t.Fatalf("keystone-manage %v (%s with keystone installed; make venv): %v\n%s", args, py, err, b)
		}
	}
	manage("db_sync")
	for _, repo := range []string{"fernet_setup", "fernet_setup", "credential_setup"} {
		manage(repo, "--keystone-user", "root", "--keystone-group", "root")
	}
	os.MkdirAll(filepath.Join(dir, "fernet-receipts"), 0o700)
	manage("bootstrap", "--bootstrap-password", k.Password, "--bootstrap-public-url", k.AuthURL, "--bootstrap-region-id", k.Region)

	serve := exec.Command(py, "-c", fmt.Sprintf(`
from wsgiref.simple_server import make_server, WSGIRequestHandler
from keystone.server.wsgi import initialize_public_application
class Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass
make_server("127.0.0.1", %d, initialize_public_application(), handler_class=Quiet).serve_forever()
`, port))
	serve.Env = append(os.Environ(), "OS_KEYSTONE_CONFIG_FILES="+conf)
	logf, err := os.Create(filepath.Join(dir, "serve.log"))
	if err != nil {
		t.Fatal(err)
	}
	serve.Stdout, serve.Stderr = logf, logf
	serve.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := serve.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { serve.Process.Kill(); serve.Wait(); logf.Close() })
	deadline := time.Now().Add(60 * time.Second)
	for {
		resp, err := http.Get(k.AuthURL)
		if err == nil {
			resp.Body.Close()
			break
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(filepath.Join(dir, "serve.log"))
			t.Fatalf("keystone did not answer at %s: %v\n%s", k.AuthURL, err, b)
		}
		time.Sleep(200 * time.Millisecond)
	}

	token, userID := k.adminToken(t)
	var svc struct {
		Service struct{ ID string } `json:"service"`
	}
	k.call(t, token, "POST", "/services", `{"service": {"type": "block-storage", "name": "cinderv3"}}`, &svc)
	k.call(t, token, "POST", "/endpoints", fmt.Sprintf(`{"endpoint": {"service_id": %q, "interface": "public", "region_id": %q, "url": %q}}`,
		svc.Service.ID, k.Region, blockStorage), nil)
	var ac struct {
		Cred struct{ ID, Secret string } `json:"application_credential"`
	}
	k.call(t, token, "POST", "/users/"+userID+"/application_credentials", `{"application_credential": {"name": "vmthunder-test"}}`, &ac)
	k.AppCredID, k.AppSecret = ac.Cred.ID, ac.Cred.Secret
	return k
}

func (k *Keystone) adminToken(t testing.TB) (token, userID string) {
	t.Helper()
	body := fmt.Sprintf(`{"auth": {"identity": {"methods": ["password"], "password": {"user": {"name": %q, "domain": {"name": "Default"}, "password": %q}}},
		"scope": {"project": {"name": %q, "domain": {"name": "Default"}}}}}`, k.Username, k.Password, k.Project)
	resp, err := http.Post(k.AuthURL+"/auth/tokens", "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out struct {
		Token struct {
			User struct{ ID string } `json:"user"`
		} `json:"token"`
	}
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 201 || json.Unmarshal(b, &out) != nil {
		t.Fatalf("keystone token: %s %s", resp.Status, b)
	}
	return resp.Header.Get("X-Subject-Token"), out.Token.User.ID
}

func (k *Keystone) call(t testing.TB, token, method, path, body string, out any) {
	t.Helper()
	req, _ := http.NewRequest(method, k.AuthURL+path, strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("X-Auth-Token", token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode >= 300 {
		t.Fatalf("keystone %s %s: %s %s", method, path, resp.Status, b)
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			t.Fatalf("keystone %s %s: %v: %s", method, path, err, b)
		}
	}
}

func freePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}
