package openstack

import "testing"

// Another node attaching or detaching a template at the same moment must
// not hide it; a volume in error, being created or deleted is not served.
func TestTemplateServable(t *testing.T) {
	for status, want := range map[string]bool{
		"available": true, "in-use": true, "reserved": true, "attaching": true, "detaching": true,
		"creating": false, "error": false, "deleting": false, "maintenance": false, "downloading": false, "": false,
	} {
		if got := TemplateServable(status); got != want {
			t.Errorf("TemplateServable(%q) = %v, want %v", status, got, want)
		}
	}
}
