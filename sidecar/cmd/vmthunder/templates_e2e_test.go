package main

import (
	"bytes"
	"context"
	"crypto/md5"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmthunder/vmthunder/sidecar/api"
	"github.com/vmthunder/vmthunder/sidecar/api/client"
	"github.com/vmthunder/vmthunder/sidecar/config"
	"github.com/vmthunder/vmthunder/sidecar/openstack"
	"github.com/vmthunder/vmthunder/sidecar/openstack/openstacktest"
)

// cinderCloud is a real one-node Cinder 29 + Glance 33 (tests/openstack:
// cinder-api, -scheduler, -volume with noauth, RabbitMQ, a file-on-tgtd
// backend).
type cinderCloud = openstacktest.Cloud

// tmplNode is a daemon process with a [cinder] section naming host.
func tmplNode(t *testing.T, c *cinderCloud, host string) *daemonProc {
	t.Helper()
	return startDaemonIn(t, daemonTempDir(t, "vmtt-"), daemonConfig{sections: cinderSection(c, host)})
}

// cinderSection is the [cinder] section of a node named host on c.
func cinderSection(c *cinderCloud, host string) string {
	return fmt.Sprintf(`[cinder]
auth_strategy = noauth
endpoint = %s
template_volume_type = %s
host = %s
`, c.Endpoint, c.TemplateVolumeType, host)
}

func cinderClient(t *testing.T, conf string) *openstack.Client {
	t.Helper()
	cfg, _, err := config.Load(conf)
	if err != nil {
		t.Fatal(err)
	}
	c, err := openstack.New(context.Background(), cfg.Cinder)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// otherNodeClient is a Cinder client of the node's config under another
// host name: a second compute node's attachments.
func otherNodeClient(t *testing.T, conf, host string) *openstack.Client {
	t.Helper()
	cfg, _, err := config.Load(conf)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Cinder.Host = host
	c, err := openstack.New(context.Background(), cfg.Cinder)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// deleteVolume removes a volume the test made when it ends (each
// project has a volume quota), and the manifest volume publish made with
// it.
func deleteVolume(t *testing.T, c *openstack.Client, id string) {
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if v, err := c.Volume(ctx, id); err == nil {
			if mv := v.Metadata[openstack.MetaManifestVolume]; mv != "" {
				deleteNow(t, ctx, c, mv)
			}
		}
		deleteNow(t, ctx, c, id)
	})
}

func deleteNow(t *testing.T, ctx context.Context, c *openstack.Client, id string) {
	if _, err := c.WaitStatus(ctx, id, time.Minute, nil, "available", "error"); err != nil && !openstack.IsNotFound(err) {
		t.Logf("volume %s: %v", id, err)
	}
	if err := c.DeleteVolume(ctx, id); err != nil && !openstack.IsNotFound(err) {
		t.Errorf("deleting volume %s: %v", id, err)
	}
}

// hostAttachments are the attachments host holds on volume id, per Cinder.
func hostAttachments(t *testing.T, c *openstack.Client, id string) []string {
	t.Helper()
	v, err := c.Volume(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	return c.HostAttachments(v)
}

// readPrefix reads the first n bytes of an NBD export with qemu-img (a
// client that is not ours); n is a multiple of 512.
func readPrefix(t *testing.T, socket, export string, n int) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "read.raw")
	opts := fmt.Sprintf("driver=raw,size=%d,file.driver=nbd,file.server.type=unix,file.server.path=%s,file.export=%s", n, socket, export)
	if b, err := exec.Command("qemu-img", "convert", "--image-opts", opts, "-O", "raw", out).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img convert %s: %v: %s", opts, err, b)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// The whole template path against a real Cinder: publish a file, list it,
// two cow exports of it share one base and one read-only attachment, the
// data read is the file's, a daemon restart re-attaches, the last export
// going deletes the attachment in Cinder, an attachment a crash left is
// deleted at start, and a volume that is not a template is refused.
func testTemplateVolumes(t *testing.T, cl *cinderCloud) {
	host := fmt.Sprintf("vmt-e2e-%d", os.Getpid())
	node := tmplNode(t, cl, host)
	cc := cinderClient(t, node.conf)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	// Publish an odd-sized file (the last block is padded, the generation
	// covers the file's bytes only).
	size := 3<<20 + 12345
	img, data := randomFile(t, node.dir, "image.raw", size)
	sum := sha256.Sum256(data)
	gen := "sha256:" + hex.EncodeToString(sum[:])
	out, errOut, code := node.cli("publish", "--config", node.conf, "--file", img, "--name", "e2e-"+host, "--image-id", "img-"+host, "--json")
	if code != 0 {
		t.Fatalf("publish: exit %d: %s", code, errOut)
	}
	if !strings.Contains(errOut, "write: ") || !strings.Contains(errOut, "(100%)") {
		t.Errorf("publish printed no progress lines off a terminal: %s", errOut)
	}
	var pub api.Template
	if err := json.Unmarshal([]byte(out), &pub); err != nil {
		t.Fatalf("publish --json: %v: %s", err, out)
	}
	deleteVolume(t, cc, pub.VolumeID)
	if pub.Generation != gen || pub.Size != int64(size) || pub.ImageID != "img-"+host || pub.ChunkSize != 64<<10 {
		t.Fatalf("published %+v, want generation %s size %d", pub, gen, size)
	}
	vol, err := cc.Volume(ctx, pub.VolumeID)
	if err != nil {
		t.Fatal(err)
	}
	if vol.Metadata["vmthunder_image_checksum"] == "" || !vol.Multiattach || vol.Status != "available" {
		t.Fatalf("volume after publish: status %s multiattach %v metadata %v", vol.Status, vol.Multiattach, vol.Metadata)
	}
	if n := len(cc.HostAttachments(vol)) + len(vol.Attachments); n != 0 {
		t.Fatalf("publish left %d attachments", n)
	}

	// Listed by the CLI (straight from Cinder) and by the daemon.
	if l := node.mustCLI("templates", "--config", node.conf, "--image-id", "img-"+host); !strings.Contains(l, pub.VolumeID) || !strings.Contains(l, gen) {
		t.Fatalf("vmthunder templates:\n%s", l)
	}
	ac := client.New(node.api)
	l, err := ac.Templates(ctx, "img-"+host)
	if err != nil || len(l) != 1 || l[0].VolumeID != pub.VolumeID || l[0].Generation != gen || l[0].Status != "available" {
		t.Fatalf("GET /v1/templates?image_id: %v %+v", err, l)
	}
	if l, err := ac.Templates(ctx, "no-such-image"); err != nil || len(l) != 0 {
		t.Fatalf("templates of another image: %v %+v", err, l)
	}

	// Another node is in the middle of attaching the template (its
	// attachment made, not yet complete: Cinder refuses new ones): this
	// node's first export waits it out instead of failing.
	other := otherNodeClient(t, node.conf, "other-"+host)
	pending, err := other.BeginAttach(ctx, pub.VolumeID, openstack.ModeRO)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { other.Detach(context.Background(), pending.ID) })
	completed := make(chan error, 1)
	go func() {
		time.Sleep(3 * time.Second)
		completed <- other.CompleteAttach(ctx, pending.ID)
	}()

	// Two cow exports: one base, one attachment, the file's bytes.
	var exps [2]*apiExport
	began := time.Now()
	for i := range exps {
		e, err := ac.Create(ctx, apiCreate(fmt.Sprintf("vm%d", i), pub.VolumeID))
		if err != nil {
			t.Fatalf("create vm%d: %v", i, err)
		}
		exps[i] = e
	}
	if waited := time.Since(began); waited < 2500*time.Millisecond {
		t.Errorf("the exports were made after %v, before the other node's attach completed (3 s)", waited)
	}
	if err := <-completed; err != nil {
		t.Fatalf("the other node's attach: %v", err)
	}
	if err := other.Detach(ctx, pending.ID); err != nil {
		t.Fatal(err)
	}
	if exps[0].Base != exps[1].Base || !strings.HasPrefix(exps[0].Base, "tmpl-"+pub.VolumeID+".g") ||
		exps[0].TemplateVolume != pub.VolumeID || exps[0].Generation != gen || exps[0].Template != "tmpl-"+pub.VolumeID {
		t.Fatalf("exports %+v %+v", exps[0], exps[1])
	}
	if strings.Contains(exps[0].Origin, "auth_password") {
		t.Fatalf("origin shows a secret: %s", exps[0].Origin)
	}
	att := hostAttachments(t, cc, pub.VolumeID)
	if len(att) != 1 {
		t.Fatalf("Cinder has %d attachments of host %s, want 1: %v", len(att), host, att)
	}
	// The CLI makes one too (readonly), on the same base and attachment.
	var cliExp api.Export
	if err := json.Unmarshal([]byte(node.mustCLI("attach", "--id", "cli-ro", "--template-volume", pub.VolumeID, "--mode", "readonly", "--json")), &cliExp); err != nil {
		t.Fatal(err)
	}
	if cliExp.Base != exps[0].Base || cliExp.TemplateVolume != pub.VolumeID || len(hostAttachments(t, cc, pub.VolumeID)) != 1 {
		t.Fatalf("vmthunder attach --template-volume: %+v", cliExp)
	}
	node.mustCLI("detach", "cli-ro")
	aligned := (size + 511) &^ 511
	for _, e := range exps {
		got := readPrefix(t, e.Socket, e.ID, aligned)
		if !bytes.Equal(got[:size], data) || !bytes.Equal(got[size:], make([]byte, aligned-size)) {
			t.Fatalf("export %s does not read the published file", e.ID)
		}
	}
	// One base, open with both exports; the second export's reads came
	// from the node's cache, not from the target again.
	bases, err := ac.Bases(ctx)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, b := range bases {
		if b.ID == exps[0].Base {
			n++
			if b.Exports != 2 || !b.InUse {
				t.Errorf("base %+v, want in use by 2 exports", b)
			}
		}
	}
	if n != 1 {
		t.Fatalf("bases %+v, want one %s", bases, exps[0].Base)
	}
	if x, err := ac.Get(ctx, "vm1"); err != nil || x.Stats == nil || x.Stats.OriginBytes > uint64(aligned)+64<<10 || x.Stats.CacheHitBytes == 0 {
		t.Errorf("after both exports read the image: %v %+v, want origin bytes about one image (%d)", err, x.Stats, aligned)
	}
	// A guest's write stays in its own store.
	qemuIOWrite(t, exps[0].URI, "write -P 0x5a 0 65536")
	if got := readPrefix(t, exps[1].Socket, exps[1].ID, 65536); !bytes.Equal(got, data[:65536]) {
		t.Fatal("a write to vm0 shows in vm1")
	}

	// Refusals.
	plain, err := cc.CreateVolume(ctx, openstack.CreateOpts{Name: "plain-" + host, SizeGiB: 1})
	if err != nil {
		t.Fatal(err)
	}
	deleteVolume(t, cc, plain.ID)
	if _, err := cc.WaitStatus(ctx, plain.ID, 2*time.Minute, nil, "available"); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		vol, mode string
		status    int
		code, msg string
	}{
		{plain.ID, "cow", 400, "invalid", "not a published template"},
		{"00000000-0000-4000-8000-000000000000", "cow", 404, "not_found", "no volume"},
		{pub.VolumeID, "write-through", 400, "invalid", "want cow or readonly"},
	} {
		_, err := ac.Create(ctx, apiCreate("bad", tc.vol, tc.mode))
		var ae *apiError
		if !errors.As(err, &ae) || ae.Status != tc.status || ae.Code != tc.code || !strings.Contains(ae.Message, tc.msg) {
			t.Errorf("create from %s (%s): %v, want %d %s %q", tc.vol, tc.mode, err, tc.status, tc.code, tc.msg)
		}
	}
	if n := len(hostAttachments(t, cc, plain.ID)); n != 0 {
		t.Errorf("the refused volume has %d attachments", n)
	}

	// A restart re-attaches (the stopped daemon's base closed and let its
	// attachment go) and serves the same bytes.
	node.stop()
	if n := len(hostAttachments(t, cc, pub.VolumeID)); n != 0 {
		t.Fatalf("a stopped daemon holds %d attachments", n)
	}
	node.start()
	if e, err := ac.Get(ctx, "vm1"); err != nil || e.State != "ready" {
		t.Fatalf("vm1 after restart: %v %+v", err, e)
	}
	if att2 := hostAttachments(t, cc, pub.VolumeID); len(att2) != 1 {
		t.Fatalf("after restart: %d attachments, want 1", len(att2))
	}
	if got := readPrefix(t, exps[1].Socket, "vm1", aligned); !bytes.Equal(got[:size], data) {
		t.Fatal("vm1 reads other bytes after the restart")
	}
	if got := readPrefix(t, exps[0].Socket, "vm0", 65536); !bytes.Equal(got, bytes.Repeat([]byte{0x5a}, 65536)) {
		t.Fatal("vm0 lost its write over the restart")
	}

	// The last export going deletes the attachment.
	if err := ac.Delete(ctx, "vm0", true); err != nil {
		t.Fatal(err)
	}
	if n := len(hostAttachments(t, cc, pub.VolumeID)); n != 1 {
		t.Fatalf("with vm1 left: %d attachments, want 1", n)
	}
	if err := ac.Delete(ctx, "vm1", true); err != nil {
		t.Fatal(err)
	}
	if n := len(hostAttachments(t, cc, pub.VolumeID)); n != 0 {
		t.Fatalf("no export left, Cinder still has %d attachments of this host", n)
	}

	// An attachment a crash left is deleted at the next start.
	if _, err := cc.Attach(ctx, pub.VolumeID, openstack.ModeRO); err != nil {
		t.Fatal(err)
	}
	node.stop()
	node.start()
	deadline := time.Now().Add(60 * time.Second)
	for len(hostAttachments(t, cc, pub.VolumeID)) != 0 {
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(node.log)
			t.Fatalf("the left-behind attachment was not deleted at start\n%s", b)
		}
		time.Sleep(500 * time.Millisecond)
	}
	if b, _ := os.ReadFile(node.log); !bytes.Contains(b, []byte("left behind")) {
		t.Error("the daemon did not log the attachment it deleted")
	}
}

type (
	apiExport = api.Export
	apiError  = api.Error
)

func apiCreate(id, vol string, mode ...string) api.CreateRequest {
	m := api.ModeCOW
	if len(mode) > 0 {
		m = mode[0]
	}
	return api.CreateRequest{ID: id, TemplateVolume: vol, Mode: m}
}

func qemuIOWrite(t *testing.T, uri, cmd string) {
	t.Helper()
	b, err := exec.Command("qemu-io", "-f", "raw", "-c", cmd, uri).CombinedOutput()
	if err != nil || bytes.Contains(b, []byte("failed")) {
		t.Fatalf("qemu-io %s: %v: %s", cmd, err, b)
	}
}

// uploadImage stores data as a raw image in the harness's Glance (no
// auth) and returns its id.
func uploadImage(t *testing.T, glance string, data []byte) string {
	t.Helper()
	body := `{"name": "vmt-e2e", "disk_format": "raw", "container_format": "bare", "visibility": "public"}`
	resp, err := http.Post(glance+"/v2/images", "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	var img struct {
		ID string `json:"id"`
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 201 || json.Unmarshal(b, &img) != nil || img.ID == "" {
		t.Fatalf("glance image create: %s %s", resp.Status, b)
	}
	req, _ := http.NewRequest("PUT", glance+"/v2/images/"+img.ID+"/file", bytes.NewReader(data))
	req.Header.Set("Content-Type", "application/octet-stream")
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 204 {
		t.Fatalf("glance image upload: %s", resp.Status)
	}
	return img.ID
}

// publish --image: Cinder makes the volume from a Glance image; the
// generation is the sha256 of the whole volume read back, the checksum
// Glance's, and an export of it reads the image.
func testPublishFromImage(t *testing.T, cl *cinderCloud) {
	if cl.GlanceEndpoint == "" {
		t.Fatal("the Cinder harness started no Glance")
	}
	host := fmt.Sprintf("vmt-e2e-img-%d", os.Getpid())
	node := tmplNode(t, cl, host)
	data := make([]byte, 3<<20)
	if _, err := io.ReadFull(randReader{}, data); err != nil {
		t.Fatal(err)
	}
	image := uploadImage(t, cl.GlanceEndpoint, data)
	start := time.Now()
	out, errOut, code := node.cli("publish", "--config", node.conf, "--image", image, "--json")
	if code != 0 {
		t.Fatalf("publish --image: exit %d: %s", code, errOut)
	}
	took := time.Since(start)
	var pub api.Template
	if err := json.Unmarshal([]byte(out), &pub); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	cc := cinderClient(t, node.conf)
	deleteVolume(t, cc, pub.VolumeID)
	// The content is the whole LUN: the image, then zeroes up to the
	// volume's size (at most 1 GiB).
	if pub.Size < int64(len(data)) || pub.Size > 1<<30 {
		t.Fatalf("published %+v: size outside [%d, 1 GiB]", pub, len(data))
	}
	h := sha256.New()
	h.Write(data)
	io.CopyN(h, zeroReader{}, pub.Size-int64(len(data)))
	want := "sha256:" + hex.EncodeToString(h.Sum(nil))
	if pub.Generation != want || pub.ImageID != image || pub.Name != "vmthunder-template-"+image {
		t.Fatalf("published %+v, want generation %s", pub, want)
	}
	t.Logf("publish --image (%d bytes) took %v (create from image, read back)", pub.Size, took.Round(time.Millisecond))
	v, err := cc.Volume(context.Background(), pub.VolumeID)
	if err != nil {
		t.Fatal(err)
	}
	sum := md5.Sum(data)
	if v.Metadata["vmthunder_image_checksum"] != hex.EncodeToString(sum[:]) || v.Metadata["vmthunder_template"] != "1" {
		t.Errorf("metadata %v, want Glance's checksum %x", v.Metadata, sum)
	}
	x, err := client.New(node.api).Create(context.Background(), apiCreate("img-vm", pub.VolumeID, api.ModeReadOnly))
	if err != nil {
		t.Fatal(err)
	}
	if got := readPrefix(t, x.Socket, x.ID, len(data)); !bytes.Equal(got, data) {
		t.Fatal("the export does not read the Glance image")
	}
	if err := client.New(node.api).Delete(context.Background(), "img-vm", false); err != nil {
		t.Fatal(err)
	}
	if n := len(hostAttachments(t, cc, pub.VolumeID)); n != 0 {
		t.Errorf("%d attachments left", n)
	}
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) { clear(p); return len(p), nil }

type randReader struct{}

func (randReader) Read(p []byte) (int, error) { return rand.Read(p) }

// TestTemplatesThroughOpenStack runs the template tests against one real
// Cinder 29 + Glance 33 (tests/openstack), started once for them.
func TestTemplatesThroughOpenStack(t *testing.T) {
	cl := openstacktest.StartCinder(t)
	t.Run("file", func(t *testing.T) { testTemplateVolumes(t, cl) })
	t.Run("image", func(t *testing.T) { testPublishFromImage(t, cl) })
}
