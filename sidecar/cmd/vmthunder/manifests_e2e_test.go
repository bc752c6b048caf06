package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmthunder/vmthunder/sidecar/api"
	"github.com/vmthunder/vmthunder/sidecar/api/client"
	"github.com/vmthunder/vmthunder/sidecar/daemon"
	"github.com/vmthunder/vmthunder/sidecar/openstack"
	"github.com/vmthunder/vmthunder/sidecar/openstack/openstacktest"
	"github.com/vmthunder/vmthunder/sidecar/peers"
	"github.com/vmthunder/vmthunder/sidecar/peers/pkitest"
)

// loopbackPort is a free TCP port on 127.0.0.1 (memberlist binds UDP on
// the same port; a clash fails the daemon's start, which the test shows).
func loopbackPort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// peerTmplNode is a daemon process with a [cinder] section naming host
// and [peers] enabled as member name (a certificate of ca), joining join
// (a gossip address, "" for the first node). It returns the daemon and
// its own gossip address.
func peerTmplNode(t *testing.T, c *cinderCloud, host string, ca *pkitest.CA, name, join string) (*daemonProc, string) {
	t.Helper()
	dir := daemonTempDir(t, "vmtm-")
	caF, certF, keyF, err := ca.WriteFiles(dir, name)
	if err != nil {
		t.Fatal(err)
	}
	gossip := fmt.Sprintf("127.0.0.1:%d", loopbackPort(t))
	peersSection := fmt.Sprintf(`[peers]
enabled = true
bind = %s
listen = 127.0.0.1:%d
join = %s
ca_file = %s
cert_file = %s
key_file = %s
`, gossip, loopbackPort(t), join, caF, certF, keyF)
	p := startDaemonIn(t, dir, daemonConfig{sections: cinderSection(c, host) + "\n" + peersSection})
	return p, gossip
}

// basePeers polls node's view of base until ok accepts it.
func basePeers(t *testing.T, node *daemonProc, base string, what string, ok func(*api.BasePeers) bool) *api.BasePeers {
	t.Helper()
	ac := client.New(node.api)
	deadline := time.Now().Add(2 * time.Minute)
	for {
		b, err := ac.Base(context.Background(), base)
		if err == nil && b.Peers != nil && ok(b.Peers) {
			return b.Peers
		}
		if time.Now().After(deadline) {
			logb, _ := os.ReadFile(node.log)
			t.Fatalf("%s: base %s never %s: %v %+v\n%s", node.dir, base, what, err, b, logb)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// Manifests come with a published template (issues 13 and 14), against a
// real Cinder: publish records the manifest's root in the template's
// metadata and the manifest in a companion volume; two daemons with peers
// open the template by template_volume and get the manifest without any
// import — the first from the manifest volume, the second from the first
// — and fill from each other, the origin sending about one copy; a peer
// serving a manifest of another root is refused and counted, and the
// manifest volume is read instead; unpublish refuses while the template
// is attached, then deletes both volumes.
func testManifestDelivery(t *testing.T, cl *cinderCloud) {
	ca, err := pkitest.NewCA("vmthunder-e2e-ca")
	if err != nil {
		t.Fatal(err)
	}
	host := fmt.Sprintf("vmt-man-%d", os.Getpid())
	a, gossipA := peerTmplNode(t, cl, host+"-a", ca, "nodea", "")
	b, gossipB := peerTmplNode(t, cl, host+"-b", ca, "nodeb", gossipA)
	cc := cinderClient(t, a.conf)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	size := 4<<20 + 4096
	img, data := randomFile(t, a.dir, "image.raw", size)
	out, errOut, code := a.cli("publish", "--config", a.conf, "--file", img, "--name", "man-"+host, "--json")
	if code != 0 {
		t.Fatalf("publish: exit %d: %s", code, errOut)
	}
	var pub api.Template
	if err := json.Unmarshal([]byte(out), &pub); err != nil {
		t.Fatalf("publish --json: %v: %s", err, out)
	}
	deleteVolume(t, cc, pub.VolumeID)
	vol, err := cc.Volume(ctx, pub.VolumeID)
	if err != nil {
		t.Fatal(err)
	}
	root, mvolID := vol.Metadata[openstack.MetaManifestRoot], vol.Metadata[openstack.MetaManifestVolume]
	if !strings.HasPrefix(root, "sha256:") || mvolID == "" {
		t.Fatalf("template metadata without a manifest: %v", vol.Metadata)
	}
	deleteVolume(t, cc, mvolID)
	t.Cleanup(func() { a.stop(); b.stop() }) // before the volumes are deleted: they detach
	mvol, err := cc.Volume(ctx, mvolID)
	if err != nil {
		t.Fatal(err)
	}
	if mvol.Metadata[openstack.MetaManifestOf] != pub.VolumeID || mvol.Name != "man-"+host+".manifest" ||
		mvol.Status != "available" || len(mvol.Attachments) != 0 || mvol.Metadata[openstack.MetaTemplate] != "" {
		t.Fatalf("manifest volume %s: name %q status %s metadata %v attachments %d", mvolID, mvol.Name, mvol.Status, mvol.Metadata, len(mvol.Attachments))
	}
	if l, err := cc.Templates(ctx, ""); err != nil {
		t.Fatal(err)
	} else {
		for _, x := range l {
			if x.VolumeID == mvolID {
				t.Fatal("the manifest volume is listed as a template")
			}
		}
	}

	// Node A opens the template: no peer serves it yet, so the manifest
	// comes from the manifest volume.
	acA, acB := client.New(a.api), client.New(b.api)
	xs := make([]*api.Export, 2)
	xa, err := acA.Create(ctx, apiCreate("vm", pub.VolumeID, api.ModeReadOnly))
	xs[0] = xa
	if err != nil {
		t.Fatal(err)
	}
	base := xa.Base
	// A guest's read never waits for the manifest (it may still be coming:
	// then the origin answers).
	const early = 1 << 20
	if got, err := readNBD(filepath.Join(t.TempDir(), "early.raw"), xa.Socket, xa.ID, early); err != nil || !bytes.Equal(got, data[:early]) {
		t.Fatalf("an early read: %v", err)
	}
	pa := basePeers(t, a, base, "filled from peers", func(p *api.BasePeers) bool { return p.Source == "peers" })
	if logb, _ := os.ReadFile(a.log); !bytes.Contains(logb, []byte("fetching it in the background")) || !bytes.Contains(logb, []byte("manifest arrived")) {
		t.Error("node A did not log the manifest's fetch and arrival")
	}
	if pa.ManifestRoot != root || pa.ManifestFrom != "manifest volume "+mvolID {
		t.Fatalf("node A's manifest: %+v, want root %s from manifest volume %s", pa, root, mvolID)
	}
	// The manifest imported is the one of the published bytes.
	man, err := peers.ReadManifestFile(filepath.Join(a.dir, "cache", base, daemon.ManifestFile), root)
	if err != nil {
		t.Fatal(err)
	}
	if man.ChunkSize != 64<<10 || man.Size != int64(vol.Size)<<30 {
		t.Fatalf("manifest of %d bytes in %d-byte chunks, want the whole %d GiB LUN in 64 KiB chunks", man.Size, man.ChunkSize, vol.Size)
	}
	for c := range int64(size) / man.ChunkSize {
		off, n := man.Span(c)
		if !man.Verify(c, data[off:off+n]) {
			t.Fatalf("chunk %d of the file does not verify against the published manifest", c)
		}
	}
	if n := len(hostAttachments(t, cc, mvolID)) + len(mustVolume(t, cc, mvolID).Attachments); n != 0 {
		t.Fatalf("node A left %d attachments on the manifest volume", n)
	}

	// Node B: A serves the base, so B's manifest comes from A (verified
	// against the root in Cinder).
	waitServing(t, b, base, 1)
	if xs[1], err = acB.Create(ctx, apiCreate("vm", pub.VolumeID, api.ModeReadOnly)); err != nil {
		t.Fatal(err)
	}
	pb := basePeers(t, b, base, "filled from peers", func(p *api.BasePeers) bool { return p.Source == "peers" })
	if pb.ManifestRoot != root || pb.ManifestFrom != "peer nodea" || pb.CorruptManifests != 0 {
		t.Fatalf("node B's manifest: %+v, want root %s from peer nodea", pb, root)
	}
	waitServing(t, a, base, 2)
	waitServing(t, b, base, 2)

	// Both read the image at once: each chunk crosses from the target
	// about once, and each node gets chunks from the other.
	aligned := (size + 511) &^ 511
	var wg sync.WaitGroup
	got, errs := make([][]byte, 2), make([]error, 2)
	readDir := t.TempDir()
	for i, x := range xs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got[i], errs[i] = readNBD(filepath.Join(readDir, fmt.Sprint(i)), x.Socket, x.ID, aligned)
		}()
	}
	wg.Wait()
	for i := range got {
		if errs[i] != nil || !bytes.Equal(got[i][:size], data) {
			t.Fatalf("node %d does not read the published file (%v)", i, errs[i])
		}
	}
	pa = basePeers(t, a, base, "counted", func(*api.BasePeers) bool { return true })
	pb = basePeers(t, b, base, "counted", func(*api.BasePeers) bool { return true })
	origin := pa.FromOriginBytes + pb.FromOriginBytes
	t.Logf("origin bytes: A %d + B %d = %d for %d bytes read on each node (%.2f copies); from peers: A %d, B %d; corrupt chunks %d/%d",
		pa.FromOriginBytes, pb.FromOriginBytes, origin, aligned, float64(origin)/float64(aligned), pa.FromPeersBytes, pb.FromPeersBytes, pa.CorruptChunks, pb.CorruptChunks)
	// The early read filled A's first MiB alone: the chunks of it whose
	// home is B, B reads from its own origin again.
	if origin > uint64(aligned)*11/10+early || pb.FromPeersBytes == 0 || pa.FromPeersBytes == 0 || pa.CorruptChunks+pb.CorruptChunks != 0 {
		t.Errorf("want origin bytes about one copy (%d, and at most the early read again) and chunks from the other node on each: A %+v B %+v", aligned, pa, pb)
	}

	// A peer that serves a manifest of another root: A restarts with the
	// test fault; B opens the base again without its manifest, refuses
	// A's, counts it, and reads the manifest volume.
	a.stop()
	// A was the seed: back, it joins B.
	confA, err := os.ReadFile(a.conf)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(a.conf, bytes.Replace(confA, []byte("join = \n"), []byte("join = "+gossipB+"\n"), 1), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Setenv(daemon.TestFaultEnv, "corrupt-peer-manifests")
	a.start()
	os.Unsetenv(daemon.TestFaultEnv)
	if err := acB.Delete(ctx, "vm", false); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(b.dir, "cache", base, daemon.ManifestFile)); err != nil {
		t.Fatal(err)
	}
	waitServing(t, b, base, 1) // A again, with its manifest file from before
	if _, err := acB.Create(ctx, apiCreate("vm2", pub.VolumeID, api.ModeReadOnly)); err != nil {
		t.Fatal(err)
	}
	pb = basePeers(t, b, base, "filled from peers again", func(p *api.BasePeers) bool { return p.Source == "peers" })
	if pb.ManifestRoot != root || pb.ManifestFrom != "manifest volume "+mvolID || pb.CorruptManifests != 1 {
		t.Fatalf("with a peer serving a bad manifest: %+v, want root %s from the manifest volume and 1 refused", pb, root)
	}
	if logb, _ := os.ReadFile(b.log); !bytes.Contains(logb, []byte("manifest from peer refused")) {
		t.Error("node B did not log the refused manifest")
	}

	// unpublish refuses while a node has the template attached, then
	// deletes both volumes.
	_, errOut, code = a.cli("unpublish", "--config", a.conf, pub.VolumeID)
	if code == 0 || !strings.Contains(errOut, "attach") {
		t.Fatalf("unpublish of an attached template: exit %d: %s", code, errOut)
	}
	for _, v := range []string{pub.VolumeID, mvolID} {
		if _, err := cc.Volume(ctx, v); err != nil {
			t.Fatalf("after a refused unpublish: %v", err)
		}
	}
	if err := acA.Delete(ctx, "vm", false); err != nil {
		t.Fatal(err)
	}
	if err := acB.Delete(ctx, "vm2", false); err != nil {
		t.Fatal(err)
	}
	_, errOut, code = a.cli("unpublish", "--config", a.conf, pub.VolumeID)
	if code != 0 || !strings.Contains(errOut, pub.VolumeID) || !strings.Contains(errOut, mvolID) {
		t.Fatalf("unpublish: exit %d: %s", code, errOut)
	}
	for _, v := range []string{pub.VolumeID, mvolID} {
		deadline := time.Now().Add(2 * time.Minute)
		for {
			_, err := cc.Volume(ctx, v)
			if openstack.IsNotFound(err) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("volume %s still there after unpublish: %v", v, err)
			}
			time.Sleep(500 * time.Millisecond)
		}
	}
}

func mustVolume(t *testing.T, c *openstack.Client, id string) *openstack.Volume {
	t.Helper()
	v, err := c.Volume(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// waitServing waits until node sees n members serving base.
func waitServing(t *testing.T, node *daemonProc, base string, n int) {
	t.Helper()
	ac := client.New(node.api)
	deadline := time.Now().Add(time.Minute)
	for {
		ps, err := ac.Peers(context.Background())
		serving := 0
		if err == nil {
			for _, m := range ps.Members {
				for _, x := range m.Bases {
					if x == base && m.State == "alive" {
						serving++
					}
				}
			}
		}
		if serving >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s sees %d members serving %s, want %d: %v %+v", node.dir, serving, base, n, err, ps)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// readNBD reads the first n bytes of an NBD export with qemu-img (safe
// in a goroutine: it returns its error).
func readNBD(out, socket, export string, n int) ([]byte, error) {
	defer os.Remove(out)
	opts := fmt.Sprintf("driver=raw,size=%d,file.driver=nbd,file.server.type=unix,file.server.path=%s,file.export=%s", n, socket, export)
	if b, err := exec.Command("qemu-img", "convert", "--image-opts", opts, "-O", "raw", out).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("qemu-img convert %s: %v: %s", opts, err, b)
	}
	return os.ReadFile(out)
}

func TestManifestsThroughOpenStack(t *testing.T) {
	testManifestDelivery(t, openstacktest.StartCinder(t))
}
