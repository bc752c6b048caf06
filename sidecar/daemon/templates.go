package daemon

// Template volumes (issue 13): an image published once in Cinder as a
// read-only, multi-attach volume tagged vmthunder_template=1. An export
// names it by "template_volume"; the daemon reads its generation from
// Cinder, and while the template's base is open on this node holds ONE
// Cinder attachment of it (mode ro, this node's connector), whose LUN the
// base's origin reads. The attachment is made when the base's origin
// opens and deleted when it closes (the base's last export or warm-up
// going, or the daemon stopping); one a crash left behind is deleted at
// the next start.

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vmthunder/vmthunder/sidecar/api"
	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"github.com/vmthunder/vmthunder/sidecar/openstack"
	"github.com/vmthunder/vmthunder/sidecar/origin"
	"github.com/vmthunder/vmthunder/sidecar/origin/iscsi"
)

// cinderTimeout bounds one daemon call to Cinder (an attachment create
// waits for cinder-volume to export the LUN).
const cinderTimeout = 2 * time.Minute

// templates holds the Cinder client and this node's template attachments.
type templates struct {
	mu     sync.Mutex
	client *openstack.Client
	vols   map[string]*tmplAttachment
	// manifestReads counts manifest volumes being read now (manifests.go),
	// whose attachments the start-up clean-up must leave alone.
	manifestReads atomic.Int32
}

// tmplAttachment is this node's attachment of one template volume: refs
// counts what holds it (the base's open origin, and opens under way).
type tmplAttachment struct {
	mu   sync.Mutex // held across Cinder calls: one attach per volume at a time
	refs int
	att  *openstack.Attachment
}

func errCinderUnconfigured(d *Daemon) error {
	return api.Errorf(http.StatusServiceUnavailable, api.CodeCinderUnconfigured,
		"the daemon has no [cinder] section in %s: template volumes need it (auth_strategy, endpoint or auth_url and credentials)", d.configName())
}

func cinderError(err error) error {
	var ae *api.Error
	if errors.As(err, &ae) {
		return ae
	}
	return api.Errorf(http.StatusBadGateway, api.CodeCinderError, "%s", iscsi.Redact(err.Error()))
}

// cinder is the Cinder client, made (and for keystone, authenticated) on
// first use; a failure is retried by the next call.
func (d *Daemon) cinder(ctx context.Context) (*openstack.Client, error) {
	if d.cfg.Cinder == nil {
		return nil, errCinderUnconfigured(d)
	}
	d.tmpl.mu.Lock()
	defer d.tmpl.mu.Unlock()
	if d.tmpl.client != nil {
		return d.tmpl.client, nil
	}
	c, err := openstack.New(ctx, d.cfg.Cinder)
	if err != nil {
		return nil, cinderError(err)
	}
	d.tmpl.client = c
	return c, nil
}

// Templates lists the published templates (GET /v1/templates).
func (d *Daemon) Templates(imageID string) ([]api.Template, error) {
	if err := openstack.ValidImageID(imageID); err != nil {
		return nil, api.BadRequest(api.CodeInvalid, "%v", err)
	}
	ctx, cancel := context.WithTimeout(d.ctx, cinderTimeout)
	defer cancel()
	c, err := d.cinder(ctx)
	if err != nil {
		return nil, err
	}
	l, err := c.Templates(ctx, imageID)
	if err != nil {
		return nil, cinderError(err)
	}
	return l, nil
}

// resolveTemplate fills a create's record from its template volume: base
// tmpl-<uuid> at the generation its metadata names. 404 for no such
// volume, 400 for one that is not a published template.
func (d *Daemon) resolveTemplate(r *Record) error {
	ctx, cancel := context.WithTimeout(d.ctx, cinderTimeout)
	defer cancel()
	c, err := d.cinder(ctx)
	if err != nil {
		return err
	}
	t, _, err := c.Template(ctx, r.TemplateVolume)
	switch {
	case openstack.IsNotFound(err):
		return api.Errorf(http.StatusNotFound, api.CodeNotFound, "no volume %s in Cinder", r.TemplateVolume)
	case errors.Is(err, openstack.ErrNotTemplate):
		return api.BadRequest(api.CodeInvalid, "template_volume %s: %v", r.TemplateVolume, err)
	case err != nil:
		return cinderError(err)
	case !openstack.TemplateServable(t.Status):
		return api.Errorf(http.StatusConflict, api.CodeConflict, "template volume %s is %s (want available, in-use, or an attach or detach under way)", r.TemplateVolume, t.Status)
	}
	r.TemplateVolume = t.VolumeID
	r.Base, r.Generation, r.ChunkSize = api.TemplateBase(t.VolumeID), t.Generation, t.ChunkSize
	return nil
}

func (d *Daemon) tmplEntry(vol string) *tmplAttachment {
	d.tmpl.mu.Lock()
	defer d.tmpl.mu.Unlock()
	if d.tmpl.vols == nil {
		d.tmpl.vols = map[string]*tmplAttachment{}
	}
	a := d.tmpl.vols[vol]
	if a == nil {
		a = &tmplAttachment{}
		d.tmpl.vols[vol] = a
	}
	return a
}

// acquireTemplate takes a reference on this node's attachment of vol,
// attaching it (read-only) if there is none, and returns its iSCSI
// connection_info data.
func (d *Daemon) acquireTemplate(vol string) (map[string]any, error) {
	a := d.tmplEntry(vol)
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.att == nil {
		ctx, cancel := context.WithTimeout(context.Background(), cinderTimeout)
		defer cancel()
		c, err := d.cinder(ctx)
		if err != nil {
			return nil, err
		}
		att, err := c.Attach(ctx, vol, openstack.ModeRO)
		if err != nil {
			return nil, cinderError(err)
		}
		a.att = att
		d.log.WithFields(logrus.Fields{"template_volume": vol, "attachment": att.ID,
			"origin": api.DescribeOrigin("", att.ConnectionInfo)}).Info("template volume attached (read-only)")
	}
	a.refs++
	return a.att.ConnectionInfo, nil
}

// releaseTemplate drops a reference; the last one deletes the attachment.
func (d *Daemon) releaseTemplate(vol string) {
	a := d.tmplEntry(vol)
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.refs--; a.refs > 0 || a.att == nil {
		return
	}
	a.refs = 0
	att := a.att
	a.att = nil
	log := d.log.WithFields(logrus.Fields{"template_volume": vol, "attachment": att.ID})
	// Shorter than an attach: a daemon stopping should not hang on a Cinder
	// that does not answer (the next start deletes what is left).
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := d.cinder(ctx)
	if err == nil {
		err = c.Detach(ctx, att.ID)
	}
	if err != nil {
		log.WithError(err).Warn("could not delete the template attachment; retrying (and the next daemon start deletes it)")
		d.retryDetach(att.ID, log)
		return
	}
	log.Info("template attachment deleted (no export of the template is left on this node)")
}

// retryDetach keeps deleting an attachment Cinder would not delete, while
// the daemon runs (a stopping daemon leaves it to the next start).
func (d *Daemon) retryDetach(id string, log *logrus.Entry) {
	if d.ctx.Err() != nil {
		return
	}
	// Close waits for d.wg after every API call (d.ops) is done, and
	// releases made by Close itself stop above: this Add never races Wait.
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		for wait := 5 * time.Second; ; wait = min(2*wait, 5*time.Minute) {
			select {
			case <-d.ctx.Done():
				return
			case <-time.After(wait):
			}
			ctx, cancel := context.WithTimeout(d.ctx, 30*time.Second)
			c, err := d.cinder(ctx)
			if err == nil {
				err = c.Detach(ctx, id)
			}
			cancel()
			if err == nil {
				log.Info("template attachment deleted")
				return
			}
			log.WithError(err).Debug("template attachment still not deleted")
		}
	}()
}

// templateConnInfo is the connection_info of vol's current attachment,
// nil when there is none.
func (d *Daemon) templateConnInfo(vol string) map[string]any {
	a := d.tmplEntry(vol)
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.att == nil {
		return nil
	}
	return a.att.ConnectionInfo
}

// templateOrigin opens a template base's origin: the LUN of this node's
// attachment, logged in with [cinder] initiator (the name the attachment's
// connector gave Cinder). The device holds a reference on the attachment
// until it is closed, which is when the base closes.
func (d *Daemon) templateOrigin(vol string) func(origin.Spec) (blockdev.Device, error) {
	return func(spec origin.Spec) (blockdev.Device, error) {
		ci, err := d.acquireTemplate(vol)
		if err != nil {
			return nil, err
		}
		is, err := origin.ParseConnectionInfo(ci)
		if err != nil {
			d.releaseTemplate(vol)
			return nil, err
		}
		is.ReadOnly = true
		is.Initiator = d.cfg.Cinder.Initiator
		dev, err := iscsi.Open(is)
		if err != nil {
			d.releaseTemplate(vol)
			return nil, err
		}
		var once sync.Once
		return &templateDev{Device: dev, release: func() { once.Do(func() { d.releaseTemplate(vol) }) }}, nil
	}
}

// templateDev is a template base's origin; closing it releases the
// attachment after the LUN's session is closed.
type templateDev struct {
	blockdev.Device
	release func()
}

func (t *templateDev) Unwrap() blockdev.Device { return t.Device }

func (t *templateDev) Close() error {
	err := t.Device.Close()
	t.release()
	return err
}

// withTemplate runs open for a template export while holding a reference
// on its attachment, so the options see its connection_info and a base
// that opens its origin meanwhile shares the attachment.
func (d *Daemon) withTemplate(r Record, open func() error) error {
	if r.TemplateVolume == "" {
		return open()
	}
	if d.cfg.Cinder == nil {
		return errCinderUnconfigured(d)
	}
	if _, err := d.acquireTemplate(r.TemplateVolume); err != nil {
		return err
	}
	defer d.releaseTemplate(r.TemplateVolume)
	return open()
}

// cleanTemplateAttachments deletes the attachments of template volumes
// this node (its [cinder] host) made and no longer holds: left by a daemon
// that was killed. Run at start, after the persisted exports re-attached.
func (d *Daemon) cleanTemplateAttachments() {
	if d.cfg.Cinder == nil {
		return
	}
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		ctx, cancel := context.WithTimeout(d.ctx, cinderTimeout)
		defer cancel()
		c, err := d.cinder(ctx)
		if err == nil {
			err = d.cleanAttachments(ctx, c)
		}
		if err != nil && d.ctx.Err() == nil {
			d.log.WithError(err).Warn("could not look for template attachments left behind")
		}
	}()
}

func (d *Daemon) cleanAttachments(ctx context.Context, c *openstack.Client) error {
	vols, err := c.TemplateVolumes(ctx)
	if err != nil {
		return err
	}
	for i := range vols {
		v := &vols[i]
		for _, id := range c.HostAttachments(v) {
			a := d.tmplEntry(v.ID)
			a.mu.Lock()
			held := a.att != nil && a.att.ID == id
			if !held {
				err = c.Detach(ctx, id)
			}
			a.mu.Unlock()
			log := d.log.WithFields(logrus.Fields{"template_volume": v.ID, "attachment": id})
			switch {
			case held:
			case err != nil:
				log.WithError(err).Warn("could not delete a template attachment this node left behind")
			default:
				log.Warn("deleted a template attachment this node left behind (no export holds it)")
			}
		}
		d.cleanManifestAttachments(ctx, c, v)
	}
	return nil
}

// cleanManifestAttachments deletes this node's attachments of template
// v's manifest volume (a daemon killed while reading it left them),
// unless a manifest volume is being read now.
func (d *Daemon) cleanManifestAttachments(ctx context.Context, c *openstack.Client, v *openstack.Volume) {
	ref, ok, err := openstack.ParseManifestRef(v)
	if err != nil || !ok || ref.Volume == "" {
		return
	}
	mv, err := c.Volume(ctx, ref.Volume)
	if err != nil || mv.Metadata[openstack.MetaManifestOf] != v.ID {
		return
	}
	for _, id := range c.HostAttachments(mv) {
		if d.tmpl.manifestReads.Load() > 0 {
			return
		}
		log := d.log.WithFields(logrus.Fields{"manifest_volume": mv.ID, "attachment": id})
		if err := c.Detach(ctx, id); err != nil {
			log.WithError(err).Warn("could not delete a manifest volume attachment this node left behind")
			continue
		}
		log.Warn("deleted a manifest volume attachment this node left behind")
	}
}

func (d *Daemon) templateRoutes(mux *http.ServeMux, v string) {
	mux.HandleFunc("GET "+v+"/templates", func(w http.ResponseWriter, r *http.Request) {
		for k := range r.URL.Query() {
			if k != "image_id" {
				writeError(w, api.BadRequest(api.CodeInvalid, "unknown query parameter %q (want image_id)", k))
				return
			}
		}
		l, err := d.Templates(r.URL.Query().Get("image_id"))
		answer(w, http.StatusOK, api.TemplateList{Templates: l}, err)
	})
}

// describeTemplate is a template export's origin for answers.
// It never waits for a Cinder call under way (view runs under Daemon.mu).
func (d *Daemon) describeTemplate(vol string) string {
	a := d.tmplEntry(vol)
	if !a.mu.TryLock() {
		return "cinder:" + vol
	}
	defer a.mu.Unlock()
	if a.att == nil {
		return "cinder:" + vol
	}
	return fmt.Sprintf("cinder:%s (%s)", vol, api.DescribeOrigin("", a.att.ConnectionInfo))
}
