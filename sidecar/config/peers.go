package config

import (
	"fmt"
	"net"
	"path/filepath"
	"strconv"
	"strings"

	"gopkg.in/ini.v1"
)

// Peers is the [peers] section: compute nodes fill template bases from
// each other (package peers). Off by default.
type Peers struct {
	Enabled bool
	// Bind is the gossip address (UDP and TCP); Advertise, when set, the
	// address other members reach it at.
	Bind, Advertise string
	// Join is a seed list of other members' gossip addresses.
	Join []string
	// GossipKeyFile holds the gossip encryption key (16, 24 or 32 raw
	// bytes, or that many base64- or hex-encoded); empty: gossip in clear.
	GossipKeyFile string
	// CAFile, CertFile and KeyFile are the cluster CA and this node's
	// certificate (its common name is the member name) and key, PEM.
	CAFile, CertFile, KeyFile string
	// Listen is the chunk server's address (mutual TLS).
	Listen string
	// OriginRate caps the bytes per second template bases read from their
	// origins (guest misses and prefetch alike); ServeRate, the bytes per
	// second served to peers. 0: unlimited.
	OriginRate, ServeRate int64
}

// Default ports of [peers] bind and listen.
const (
	DefaultPeersBind   = "0.0.0.0:7946"
	DefaultPeersListen = "0.0.0.0:7947"
)

var peerKeys = []string{"enabled", "bind", "advertise", "join", "gossip_key_file", "ca_file", "cert_file", "key_file", "listen", "origin_rate", "serve_rate"}

func loadPeers(s *ini.Section, c *Config, bad func(sec, key, why string) error) error {
	get := func(key string) (string, bool) {
		if !s.HasKey(key) {
			return "", false
		}
		return strings.TrimSpace(s.Key(key).String()), true
	}
	if v, ok := get("enabled"); ok {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return bad("peers", "enabled", fmt.Sprintf("%q is not a boolean", v))
		}
		c.Peers.Enabled = b
	}
	for key, dst := range map[string]*string{"bind": &c.Peers.Bind, "advertise": &c.Peers.Advertise, "listen": &c.Peers.Listen,
		"gossip_key_file": &c.Peers.GossipKeyFile, "ca_file": &c.Peers.CAFile, "cert_file": &c.Peers.CertFile, "key_file": &c.Peers.KeyFile} {
		if v, ok := get(key); ok {
			*dst = v
		}
	}
	for key, dst := range map[string]*int64{"origin_rate": &c.Peers.OriginRate, "serve_rate": &c.Peers.ServeRate} {
		if v, ok := get(key); ok {
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil || n < 0 {
				return bad("peers", key, fmt.Sprintf("%q is not a number of bytes per second (0: unlimited)", v))
			}
			*dst = n
		}
	}
	if v, ok := get("join"); ok {
		c.Peers.Join = nil
		for _, a := range strings.Split(v, ",") {
			if a = strings.TrimSpace(a); a != "" {
				c.Peers.Join = append(c.Peers.Join, a)
			}
		}
	}
	if err := c.Peers.validate(); err != nil {
		return fmt.Errorf("config %s: %s", c.File, strings.TrimPrefix(err.Error(), "config: "))
	}
	return nil
}

// validate checks [peers] when it is enabled (and fills in the default
// addresses); a disabled section is not checked.
func (p *Peers) validate() error {
	if !p.Enabled {
		return nil
	}
	if p.Bind == "" {
		p.Bind = DefaultPeersBind
	}
	if p.Listen == "" {
		p.Listen = DefaultPeersListen
	}
	bad := func(key, why string, args ...any) error {
		return fmt.Errorf("config: [peers] %s: %s", key, fmt.Sprintf(why, args...))
	}
	hostPort := func(key, v string, needHost bool) (string, error) {
		h, port, err := net.SplitHostPort(v)
		if err != nil {
			return "", bad(key, "%q is not HOST:PORT", v)
		}
		if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
			return "", bad(key, "%q has no valid port", v)
		}
		if needHost && h == "" {
			return "", bad(key, "%q has no host", v)
		}
		return h, nil
	}
	if _, err := hostPort("bind", p.Bind, false); err != nil {
		return err
	}
	adv := ""
	if p.Advertise != "" {
		var err error
		if adv, err = hostPort("advertise", p.Advertise, true); err != nil {
			return err
		}
	}
	lh, err := hostPort("listen", p.Listen, false)
	if err != nil {
		return err
	}
	if (lh == "" || net.ParseIP(lh) != nil && net.ParseIP(lh).IsUnspecified()) && adv == "" {
		return bad("listen", "%q listens on every address: set [peers] advertise (the address other nodes reach this one at), or a host in listen", p.Listen)
	}
	for _, j := range p.Join {
		if _, err := hostPort("join", j, true); err != nil {
			return err
		}
	}
	for _, kv := range [][2]string{{"ca_file", p.CAFile}, {"cert_file", p.CertFile}, {"key_file", p.KeyFile}} {
		key, v := kv[0], kv[1]
		if v == "" {
			return bad(key, "required when [peers] enabled = true (chunks move over mutual TLS)")
		}
		if !filepath.IsAbs(v) {
			return bad(key, "%q is not an absolute path", v)
		}
	}
	if p.GossipKeyFile != "" && !filepath.IsAbs(p.GossipKeyFile) {
		return bad("gossip_key_file", "%q is not an absolute path", p.GossipKeyFile)
	}
	return nil
}

// ChunkAddr is the chunk server address other members are told: listen's
// host, or advertise's when listen names every address.
func (p *Peers) ChunkAddr(listenPort string) string {
	h, port, _ := net.SplitHostPort(p.Listen)
	if listenPort != "" {
		port = listenPort
	}
	if ip := net.ParseIP(h); h == "" || ip != nil && ip.IsUnspecified() {
		h, _, _ = net.SplitHostPort(p.Advertise)
	}
	return net.JoinHostPort(h, port)
}
