package api

import (
	"os/exec"
	"strings"
	"testing"
)

// The API and its client are what the shims' peers and the CLI link: they
// depend on no data-path package, and so on no cgo (libiscsi).
func TestNoImplementationDependencies(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "-f", "{{.ImportPath}} {{if .CgoFiles}}cgo{{end}}",
		"github.com/vmthunder/vmthunder/sidecar/api/client").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		pkg, cgo, _ := strings.Cut(line, " ")
		if cgo == "cgo" && pkg != "runtime/cgo" && !strings.HasPrefix(pkg, "net") && !strings.HasPrefix(pkg, "os/user") {
			t.Errorf("api/client links cgo package %s", pkg)
		}
		if rest, ok := strings.CutPrefix(pkg, "github.com/vmthunder/vmthunder/sidecar/"); ok {
			switch rest {
			case "api", "api/client", "origin":
			default:
				t.Errorf("api/client depends on %s", pkg)
			}
		}
	}
}
