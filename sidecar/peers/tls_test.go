package peers

import (
	"context"
	"crypto/tls"
	"net/http"
	"strings"
	"testing"

	"github.com/vmthunder/vmthunder/sidecar/peers/pkitest"
)

// Only members of the cluster CA talk: a client without a certificate, or
// with one from another CA or expired, gets nothing; a server whose
// certificate is from another CA, or names another member, is not
// believed.
func TestMutualTLS(t *testing.T) {
	const chunk = 4096
	data := randomBytes(9, 2*chunk)
	ca := testCA(t)
	srv := NewServer("home", ServerOptions{})
	addr := serve(t, srv, identity(t, ca, "home"))
	if _, err := srv.Register(testKey, int64(len(data)), readerFunc(func(p []byte, off int64) error { copy(p, data[off:]); return nil })); err != nil {
		t.Fatal(err)
	}
	// A chunk the asker "a" may ask the home for.
	var c int64
	for ; Weight("a", testKey.ID, c) > Weight("home", testKey.ID, c); c++ {
	}
	if c > 1 {
		t.Skip("no chunk where the asker is below the home")
	}
	req := Request{testKey, chunk, c}
	home := Peer{"home", addr}
	good := NewClient(identity(t, ca, "a"), ClientOptions{})
	defer good.Close()
	if err := good.Fetch(context.Background(), home, req, make([]byte, chunk)); err != nil {
		t.Fatalf("member of the CA refused: %v", err)
	}

	other, err := pkitest.NewCA("another cluster")
	if err != nil {
		t.Fatal(err)
	}
	// The client's certificate is from another CA: its Identity trusts
	// that CA, so build it from the other CA's pieces but trust ours.
	cert, key, _ := other.Node("a")
	stranger, err := NewIdentity(other.CertPEM, cert, key)
	if err != nil {
		t.Fatal(err)
	}
	stranger.CA = identity(t, ca, "x").CA
	expiredCert, expiredKey, _ := ca.Expired("a")
	expired, err := tls.X509KeyPair(expiredCert, expiredKey)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := NewIdentity(ca.CertPEM, expiredCert, expiredKey); err == nil {
		t.Fatal("an expired certificate makes an identity")
	}
	expiredID := &Identity{Name: "a", CA: stranger.CA, Cert: expired}
	noCert := &Identity{Name: "a", CA: stranger.CA}

	before := srv.Stats()
	for name, id := range map[string]*Identity{"other CA": stranger, "expired": expiredID, "no certificate": noCert} {
		cl := NewClient(id, ClientOptions{})
		err := cl.Fetch(context.Background(), home, req, make([]byte, chunk))
		cl.Close()
		if err == nil {
			t.Errorf("client with %s got a chunk", name)
		}
	}
	// A plain HTTPS client (no certificate) is refused in the handshake.
	plain := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: good.id.CA, ServerName: "home"}}}
	if resp, err := plain.Get("https://" + addr + chunkPath + "?" + req.query()); err == nil {
		resp.Body.Close()
		t.Errorf("client without a certificate: status %d", resp.StatusCode)
	}
	if after := srv.Stats(); after != before {
		t.Errorf("refused clients reached the handler: %+v -> %+v", before, after)
	}

	// The client does not believe a server from another CA, nor one whose
	// certificate names another member than the one asked.
	fake := NewServer("home", ServerOptions{})
	fcert, fkey, _ := other.Node("home")
	fid, err := NewIdentity(other.CertPEM, fcert, fkey)
	if err != nil {
		t.Fatal(err)
	}
	faddr := serve(t, fake, fid)
	fake.Register(testKey, int64(len(data)), readerFunc(func(p []byte, off int64) error { return nil }))
	if err := good.Fetch(context.Background(), Peer{"home", faddr}, req, make([]byte, chunk)); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("server from another CA believed: %v", err)
	}
	if err := good.Fetch(context.Background(), Peer{"impostor", addr}, req, make([]byte, chunk)); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("server named home believed as impostor: %v", err)
	}
}
