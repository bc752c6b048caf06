package peers

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"time"
)

// An Identity is a node's place in the cluster's PKI: the cluster CA that
// every peer's certificate must chain to, and this node's certificate,
// whose common name is the node's member name. Both ends of a chunk
// transfer present one (mutual TLS): a peer without a certificate from the
// cluster CA gets nothing, and serves nothing we would accept.
type Identity struct {
	Name string
	CA   *x509.CertPool
	Cert tls.Certificate
}

// NewIdentity builds an identity from PEM: the CA certificate(s), the
// node's certificate (chain) and key. The certificate must chain to the CA
// and be valid for both client and server authentication.
func NewIdentity(caPEM, certPEM, keyPEM []byte) (*Identity, error) {
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, errors.New("peers TLS: no CA certificate in the CA file")
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("peers TLS: node certificate and key: %w", err)
	}
	leaf := cert.Leaf
	if leaf == nil {
		if leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return nil, fmt.Errorf("peers TLS: node certificate: %w", err)
		}
	}
	inter := x509.NewCertPool()
	for _, der := range cert.Certificate[1:] {
		if c, err := x509.ParseCertificate(der); err == nil {
			inter.AddCert(c)
		}
	}
	for _, u := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{u}}); err != nil {
			return nil, fmt.Errorf("peers TLS: node certificate %q is not valid for the cluster CA (it must allow server and client auth): %w", leaf.Subject.CommonName, err)
		}
	}
	name := leaf.Subject.CommonName
	if err := validName(name); err != nil {
		return nil, fmt.Errorf("peers TLS: node certificate: %w", err)
	}
	return &Identity{Name: name, CA: pool, Cert: cert}, nil
}

// LoadIdentity reads NewIdentity's inputs from files.
func LoadIdentity(caFile, certFile, keyFile string) (*Identity, error) {
	var raw [3][]byte
	for i, f := range []string{caFile, certFile, keyFile} {
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, fmt.Errorf("peers TLS: %w", err)
		}
		raw[i] = b
	}
	return NewIdentity(raw[0], raw[1], raw[2])
}

// validName is the rule for member names: a DNS name (they are the TLS
// server names peers check), at most 63 bytes per label and 253 in all.
func validName(n string) error {
	ok := n != "" && len(n) <= 253 && n[0] != '.' && n[len(n)-1] != '.'
	label := 0
	for i := 0; ok && i < len(n); i++ {
		switch c := n[i]; {
		case c == '.':
			ok, label = label > 0, 0
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '_':
			label++
			ok = label <= 63
		default:
			ok = false
		}
	}
	if !ok {
		return fmt.Errorf("member name %q is not a DNS name ([A-Za-z0-9._-], labels of 1-63)", n)
	}
	return nil
}

// ServerConfig is the TLS configuration of the chunk server: TLS 1.3, and a
// client certificate from the cluster CA is required.
func (id *Identity) ServerConfig() *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{id.Cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    id.CA,
		NextProtos:   []string{"h2"},
	}
}

// ClientConfig is the TLS configuration of the chunk client: the server's
// certificate must come from the cluster CA and name the member asked
// (the transport sets ServerName to it).
func (id *Identity) ClientConfig() *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{id.Cert},
		RootCAs:      id.CA,
		NextProtos:   []string{"h2"},
	}
}

// peerName is the member name of the authenticated client of a request.
func peerName(cs *tls.ConnectionState) string {
	if cs == nil || len(cs.PeerCertificates) == 0 {
		return ""
	}
	return cs.PeerCertificates[0].Subject.CommonName
}

// handshakeTimeout bounds a TLS handshake on either end.
const handshakeTimeout = 5 * time.Second
