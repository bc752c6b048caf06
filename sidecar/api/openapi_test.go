package api

import (
	"os"
	"reflect"
	"strings"
	"testing"
)

// Every JSON field of the API types is documented in docs/openapi.yaml and
// docs/api.md, so the documents cannot silently fall behind the code.
func TestDocsNameEveryField(t *testing.T) {
	spec, err := os.ReadFile("../../docs/openapi.yaml")
	if err != nil {
		t.Fatal(err)
	}
	md, err := os.ReadFile("../../docs/api.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range []any{CreateRequest{}, WarmRequest{}, Export{}, ExportStats{}, Base{}, WarmStatus{}, Health{}, Info{}, Stats{}, Error{}, Trace{}, Template{}, TemplateList{}, BasePeers{}, Manifest{}, PeerMember{}, Peers{}} {
		rt := reflect.TypeOf(v)
		for i := 0; i < rt.NumField(); i++ {
			tag, _, _ := strings.Cut(rt.Field(i).Tag.Get("json"), ",")
			if tag == "" || tag == "-" {
				continue
			}
			if !strings.Contains(string(spec), " "+tag+":") {
				t.Errorf("openapi.yaml does not document %s.%s", rt.Name(), tag)
			}
			if !strings.Contains(string(md), tag) {
				t.Errorf("api.md does not mention %s.%s", rt.Name(), tag)
			}
		}
	}
	for _, code := range []string{CodeBadJSON, CodeUnknownField, CodeMissingField, CodeInvalid, CodeBadOrigin, CodeExists,
		CodeNotFound, CodeConflict, CodeOriginError, CodeTooLarge, CodeInternal, CodeCinderUnconfigured, CodeCinderError} {
		if !strings.Contains(string(spec), code) || !strings.Contains(string(md), "`"+code+"`") {
			t.Errorf("error code %s is not documented", code)
		}
	}
}
