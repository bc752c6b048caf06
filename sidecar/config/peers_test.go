package config

import (
	"strings"
	"testing"
)

func TestPeersOffByDefault(t *testing.T) {
	c, _, err := Load(write(t, "[peers]\nbind = nonsense\n"))
	if err != nil {
		t.Fatal(err)
	}
	if c.Peers.Enabled {
		t.Fatal("peers enabled by default")
	}
}

func TestPeersLoad(t *testing.T) {
	c, warn, err := Load(write(t, `[peers]
enabled = true
advertise = 192.0.2.10:7946
join = 192.0.2.11:7946, 192.0.2.12:7946
gossip_key_file = /etc/vmthunder/peers/gossip.key
ca_file = /etc/vmthunder/peers/ca.pem
cert_file = /etc/vmthunder/peers/node.pem
key_file = /etc/vmthunder/peers/node.key
origin_rate = 25000000
`))
	if err != nil || len(warn) > 0 {
		t.Fatal(err, warn)
	}
	p := c.Peers
	if !p.Enabled || p.Bind != DefaultPeersBind || p.Listen != DefaultPeersListen || len(p.Join) != 2 || p.Join[1] != "192.0.2.12:7946" ||
		p.OriginRate != 25000000 || p.ServeRate != 0 {
		t.Fatalf("%+v", p)
	}
	if got := p.ChunkAddr("7947"); got != "192.0.2.10:7947" {
		t.Fatalf("chunk address %s", got)
	}
}

func TestPeersErrorsNameTheKey(t *testing.T) {
	files := "ca_file = /a/ca.pem\ncert_file = /a/n.pem\nkey_file = /a/n.key\n"
	for body, want := range map[string]string{
		"origin_rate = -1\n":                       "[peers] origin_rate",
		"serve_rate = 1MB\n":                       "[peers] serve_rate",
		"enabled = maybe\n":                        "[peers] enabled",
		"enabled = true\nlisten = 10.0.0.1:7947\n": "[peers] ca_file",
		"enabled = true\nlisten = 10.0.0.1:7947\n" + "bind = x\n" + files:                            "[peers] bind",
		"enabled = true\n" + files:                                                                   "[peers] listen",
		"enabled = true\nlisten = 10.0.0.1:99999\n" + files:                                          "[peers] listen",
		"enabled = true\nlisten = 10.0.0.1:7947\njoin = nohost\n" + files:                            "[peers] join",
		"enabled = true\nadvertise = :7946\n" + files:                                                "[peers] advertise",
		"enabled = true\nlisten = 10.0.0.1:7947\ngossip_key_file = k\n" + files:                      "[peers] gossip_key_file",
		"enabled = true\nlisten = 10.0.0.1:7947\nca_file = rel.pem\ncert_file = /a\nkey_file = /b\n": "[peers] ca_file",
	} {
		_, _, err := Load(write(t, "[peers]\n"+body))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: got %v, want an error naming %s", body, err, want)
		}
	}
}
