package daemon

// Manifests delivered with a template volume (issues 13 and 14): a base
// opened by template_volume with peers enabled and no manifest fills from
// its origin while a manifest is fetched in the background — from a peer
// that serves the base, else from the template's manifest volume in
// Cinder — and checked against the root in the template's Cinder metadata
// (vmthunder_manifest_root; trust comes from Cinder, never from a peer).
// It is then imported as ImportManifest does, and the base switches to
// filling from peers without closing.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vmthunder/vmthunder/sidecar/api"
	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"github.com/vmthunder/vmthunder/sidecar/layer/cache"
	"github.com/vmthunder/vmthunder/sidecar/peers"
	"github.com/vmthunder/vmthunder/sidecar/publish"
)

// maxManifestPeers is how many members serving a base are asked for its
// manifest before the manifest volume.
const maxManifestPeers = 3

// errNoManifestRef: the template was published without a manifest.
var errNoManifestRef = errors.New("the template volume names no manifest (published before manifests were; republish it, or vmthunder manifest import)")

// errManifestUnfit: the template's manifest cannot be used for the base.
var errManifestUnfit = errors.New("the template's manifest does not fit the base")

// templateVolumeOf is the Cinder volume of a template_volume base's
// template ("tmpl-<uuid>"), "" for any other template.
func templateVolumeOf(template string) string {
	vol, ok := strings.CutPrefix(template, api.TemplateBasePrefix)
	if !ok || api.ValidVolumeID(vol) != nil {
		return ""
	}
	return vol
}

// lateSource is the source of a template_volume base opened without a
// manifest: reads go to the (rate-limited) origin until the manifest
// arrives, then through a peers.Source over the same origin.
type lateSource struct {
	blockdev.Device // the origin, limited by [peers] origin_rate
	raw             blockdev.Device
	stats           *peers.SourceStats // the base's, counted here until src takes over
	src             atomic.Pointer[peers.Source]
	cancel          context.CancelFunc

	mu     sync.Mutex
	closed bool
	pb     *peerBase
	base   *cache.Base // set once the base is open (serve), to register it with the chunk server
	onStop func(*peerBase)
}

// lateSource has no Unwrap: like a peers.Source it offers no asynchronous
// read path, which would reach the origin past the peers once they fill
// the base.

func (s *lateSource) ReadAt(p []byte, off int64) (int, error) {
	if src := s.src.Load(); src != nil {
		return src.ReadAt(p, off)
	}
	n, err := s.Device.ReadAt(p, off)
	if err == nil {
		s.stats.BytesFromOrigin.Add(uint64(n))
	}
	return n, err
}

func (s *lateSource) WriteAt([]byte, int64) (int, error) { return 0, blockdev.ErrReadOnly }
func (s *lateSource) Trim(int64, int64) error            { return blockdev.ErrReadOnly }
func (s *lateSource) WriteZeroes(int64, int64) error     { return blockdev.ErrReadOnly }
func (s *lateSource) Flush() error                       { return nil }
func (s *lateSource) Prefetch(off, length int64) error {
	return blockdev.CheckRange(s.Size(), off, length)
}

// Caps are a peers.Source's from the start, so the base above sees one
// device whatever fills it.
func (s *lateSource) Caps() blockdev.Caps {
	c := s.raw.Caps()
	c.ReadOnly, c.Trim, c.WriteZeroes, c.FastZero, c.Prefetch = true, false, false, false, false
	return c
}

func (s *lateSource) Close() error {
	s.cancel()
	s.mu.Lock()
	s.closed = true
	pb := s.pb
	s.mu.Unlock()
	if pb != nil {
		s.onStop(pb)
	}
	return s.raw.Close()
}

// lateSource starts fetching base id's manifest and returns its source.
func (p *peerNode) lateSource(id, vol string, key peers.BaseKey, origin blockdev.Device) blockdev.Device {
	ctx, cancel := context.WithCancel(p.d.ctx)
	ls := &lateSource{Device: peers.LimitOrigin(origin, p.originLimit), raw: origin, stats: &p.statsOf(id).src, cancel: cancel,
		onStop: func(pb *peerBase) { p.closed(id, pb) }}
	p.mu.Lock()
	p.reason[id] = "no manifest yet: fetching it (from a peer serving the base, else the template's manifest volume in Cinder)"
	p.late[id] = ls
	p.mu.Unlock()
	p.d.wg.Add(1)
	go func() {
		defer p.d.wg.Done()
		defer func() {
			p.mu.Lock()
			if p.late[id] == ls {
				delete(p.late, id)
			}
			p.mu.Unlock()
		}()
		p.deliverManifest(ctx, id, vol, key, ls)
	}()
	return ls
}

// deliverManifest gets, imports and switches to base id's manifest,
// retrying (with backoff) while the base is open and Cinder or the
// sources fail.
func (p *peerNode) deliverManifest(ctx context.Context, id, vol string, key peers.BaseKey, ls *lateSource) {
	log := p.d.log.WithFields(logrus.Fields{"base": id, "template_volume": vol})
	log.Info("peers: base opened without a manifest; fetching it in the background (fills from its origin meanwhile)")
	for wait := 5 * time.Second; ; wait = min(2*wait, 5*time.Minute) {
		raw, root, from, err := p.fetchManifest(ctx, id, vol, key, log)
		if err == nil {
			err = p.installManifest(id, key, raw, root, from, ls, log)
			if err == nil {
				return
			}
			if ae := (*api.Error)(nil); errors.As(err, &ae) && ae.Status < 500 || errors.Is(err, peers.ErrManifest) {
				// The manifest Cinder vouches for does not fit this base
				// (another size): fetching it again would not help.
				err = fmt.Errorf("%w: %w", errManifestUnfit, err)
			}
		}
		if ctx.Err() != nil {
			return
		}
		p.mu.Lock()
		if p.late[id] == ls {
			p.reason[id] = "no manifest: " + err.Error()
		}
		p.mu.Unlock()
		if errors.Is(err, errNoManifestRef) || errors.Is(err, errManifestUnfit) {
			log.WithError(err).Warn("peers: base fills from its origin only")
			return
		}
		log.WithError(err).WithField("retry_in", wait).Warn("peers: no manifest for the base yet")
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

// fetchManifest reads the template's manifest root from Cinder, then
// asks the members serving the base for the manifest, then reads the
// manifest volume; only a manifest with that root is returned, with
// where it came from.
func (p *peerNode) fetchManifest(ctx context.Context, id, vol string, key peers.BaseKey, log *logrus.Entry) ([]byte, string, string, error) {
	cctx, cancel := context.WithTimeout(ctx, cinderTimeout)
	defer cancel()
	c, err := p.d.cinder(cctx)
	if err != nil {
		return nil, "", "", err
	}
	t, ref, ok, err := c.TemplateManifest(cctx, vol)
	switch {
	case err != nil:
		return nil, "", "", cinderError(err)
	case t.Generation != key.Generation:
		return nil, "", "", fmt.Errorf("%w: template volume %s is now generation %s, the base is %s", errNoManifestRef, vol, t.Generation, key.Generation)
	case !ok:
		return nil, "", "", errNoManifestRef
	}
	st := p.statsOf(id)
	self, asked := p.ml.Self(), 0
	for _, peer := range p.ml.Serving(id) {
		if peer.Name == self || asked >= maxManifestPeers {
			continue
		}
		asked++
		raw, err := p.cl.FetchManifest(ctx, peer, key)
		if err != nil {
			log.WithError(err).WithField("peer", peer.Name).Info("peers: no manifest from peer")
			continue
		}
		m, err := peers.ParseManifest(raw)
		if err == nil && m.Root() != ref.Root {
			err = fmt.Errorf("%w: root %s, the template's metadata names %s", peers.ErrManifest, m.Root(), ref.Root)
		}
		if err != nil {
			st.corruptManifests.Add(1)
			log.WithError(err).WithField("peer", peer.Name).Warn("peers: manifest from peer refused")
			continue
		}
		return raw, ref.Root, "peer " + peer.Name, nil
	}
	if ref.Volume == "" {
		return nil, "", "", fmt.Errorf("no peer had the manifest (asked %d) and template volume %s names no manifest volume", asked, vol)
	}
	p.d.tmpl.manifestReads.Add(1)
	m, err := publish.ReadManifestVolume(cctx, c, ref.Volume, p.d.cfg.Cinder.Initiator, ref.Root)
	p.d.tmpl.manifestReads.Add(-1)
	if err != nil {
		return nil, "", "", cinderError(err)
	}
	raw, _ := m.MarshalBinary()
	return raw, ref.Root, "manifest volume " + ref.Volume, nil
}

// installManifest imports raw as base id's manifest and switches its
// source to peers, then serves the base if it is open.
func (p *peerNode) installManifest(id string, key peers.BaseKey, raw []byte, root, from string, ls *lateSource, log *logrus.Entry) error {
	if _, err := p.d.ImportManifest(id, bytes.NewReader(raw), root); err != nil {
		return err
	}
	m, err := peers.ParseManifest(raw)
	if err != nil {
		return err
	}
	st := p.statsOf(id)
	src, err := peers.NewSource(ls.raw, peers.SourceOptions{Key: key, Manifest: m, Members: p.ml, Fetcher: p.cl, Stats: &st.src, OriginLimit: p.originLimit, Traffic: p.traffic})
	if err != nil {
		return err
	}
	pb := &peerBase{key: key, src: src, root: root, manifest: raw}
	ls.mu.Lock()
	if ls.closed {
		ls.mu.Unlock()
		return nil // imported: the base's next open uses it
	}
	ls.pb = pb
	ls.src.Store(src)
	base := ls.base
	p.mu.Lock()
	delete(p.reason, id)
	p.bases[id] = pb
	st.manifestFrom = from
	p.mu.Unlock()
	ls.mu.Unlock()
	log.WithFields(logrus.Fields{"manifest": root, "from": from}).Info("peers: manifest arrived; base fills from peers")
	if base != nil {
		p.register(id, base)
	}
	return nil
}

// pendingServe remembers an open base whose manifest is still coming, so
// it is served once it arrives; it reports whether the base is such a one.
func (p *peerNode) pendingServe(id string, base *cache.Base) bool {
	p.mu.Lock()
	ls := p.late[id]
	p.mu.Unlock()
	if ls == nil {
		return false
	}
	ls.mu.Lock()
	defer ls.mu.Unlock()
	if ls.pb != nil {
		return false
	}
	ls.base = base
	return true
}

// manifestFile is the chunk server's answer to GET /v1/manifest: the
// manifest a base this node serves is verified against.
func (p *peerNode) manifestFile(key peers.BaseKey) ([]byte, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	pb := p.bases[key.ID]
	if pb == nil || pb.key != key || pb.manifest == nil {
		return nil, fmt.Errorf("base %s has no manifest here: %w", key.ID, os.ErrNotExist)
	}
	return pb.manifest, nil
}
