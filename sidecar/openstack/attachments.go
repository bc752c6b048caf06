package openstack

import (
	"context"
	"fmt"
	"net/http"
	"time"

	"github.com/gophercloud/gophercloud/v2"
	"github.com/gophercloud/gophercloud/v2/openstack/blockstorage/v3/attachments"

	"github.com/vmthunder/vmthunder/sidecar/origin"
)

// Attachment modes.
const (
	ModeRO = "ro"
	ModeRW = "rw"
)

// Attachment is one of this node's attachments: its id and the iSCSI
// connection_info "data" Cinder gave for it (CHAP secret included: keep
// it out of logs and answers; origin.ISCSI.String redacts).
type Attachment struct {
	ID             string
	VolumeID       string
	ConnectionInfo map[string]any
}

// createBody is an attachment create (3.54: mode at the top level). It
// names no instance: an attachment "connected to a vm" may only be deleted
// by Nova (Cinder asks Nova first, bug #2004555), and this one is the
// node's, not a VM's.
type createBody struct {
	VolumeUUID string         `json:"volume_uuid"`
	Connector  map[string]any `json:"connector"`
	Mode       string         `json:"mode"`
}

func (b createBody) ToAttachmentCreateMap() (map[string]any, error) {
	return gophercloud.BuildRequestBody(b, "attachment")
}

// Attach creates an attachment of volume id to this node (its connector,
// mode ro or rw), marks it complete, and returns it with the iSCSI
// connection_info (checked: iscsi, parsable by origin). A failure after
// the create deletes the attachment again.
func (c *Client) Attach(ctx context.Context, volumeID, mode string) (*Attachment, error) {
	a, err := c.BeginAttach(ctx, volumeID, mode)
	if err != nil {
		return nil, err
	}
	ci, err := ISCSIData(a.ConnectionInfo)
	if err == nil {
		err = c.CompleteAttach(ctx, a.ID)
	}
	if err != nil {
		if derr := c.Detach(context.WithoutCancel(ctx), a.ID); derr != nil {
			err = fmt.Errorf("%w (and deleting the attachment again: %v)", err, derr)
		}
		return nil, err
	}
	return &Attachment{ID: a.ID, VolumeID: volumeID, ConnectionInfo: ci}, nil
}

// BeginAttach creates an attachment without completing it (the volume
// stays reserved or attaching until CompleteAttach). Cinder refuses a new
// attachment while a multi-attach volume is reserved, attaching or
// detaching for someone else, which lasts only while that other attach
// or detach runs: then the create is retried, with backoff, until ctx ends.
func (c *Client) BeginAttach(ctx context.Context, volumeID, mode string) (*attachments.Attachment, error) {
	wait := 200 * time.Millisecond
	for {
		a, err := attachments.Create(ctx, c.bs, createBody{VolumeUUID: volumeID,
			Connector: c.Connector(mode), Mode: mode}).Extract()
		if err == nil {
			return a, nil
		}
		if !gophercloud.ResponseCodeIs(err, http.StatusBadRequest) || !c.busyElsewhere(ctx, volumeID) {
			return nil, wrap("attach volume "+volumeID, err)
		}
		select {
		case <-ctx.Done():
			return nil, wrap("attach volume "+volumeID+" (it stayed busy with another attach or detach)", err)
		case <-time.After(wait):
		}
		wait = min(2*wait, 2*time.Second)
	}
}

// busyElsewhere reports whether volume id is in the middle of an attach
// or detach (its status says so), the one refusal worth waiting out.
func (c *Client) busyElsewhere(ctx context.Context, id string) bool {
	v, err := c.Volume(ctx, id)
	if err != nil {
		return false
	}
	switch v.Status {
	case "reserved", "attaching", "detaching":
		return true
	}
	return false
}

// CompleteAttach marks attachment id complete (the volume becomes in-use).
func (c *Client) CompleteAttach(ctx context.Context, attachmentID string) error {
	return wrap("complete attachment "+attachmentID, attachments.Complete(ctx, c.bs, attachmentID).ExtractErr())
}

// Detach deletes an attachment; one already gone is not an error.
func (c *Client) Detach(ctx context.Context, attachmentID string) error {
	err := attachments.Delete(ctx, c.bs, attachmentID).ExtractErr()
	if err != nil && gophercloud.ResponseCodeIs(err, 404) {
		return nil
	}
	return wrap("delete attachment "+attachmentID, err)
}

// HostAttachments lists the attachments of volume v that this node made:
// attached to its host, and to no instance (a VM's are Nova's).
func (c *Client) HostAttachments(v *Volume) []string {
	var ids []string
	for _, a := range v.Attachments {
		if a.HostName == c.cfg.Host && a.ServerID == "" {
			id := a.AttachmentID
			if id == "" {
				id = a.ID
			}
			ids = append(ids, id)
		}
	}
	return ids
}

// ISCSIData turns an attachment's connection_info (Cinder merges the
// driver's "data" into it beside driver_volume_type) into the iSCSI
// connection_info data the origin parser reads, or says why it cannot.
func ISCSIData(ci map[string]any) (map[string]any, error) {
	if ci == nil {
		return nil, &Error{Op: "attachment", Message: "no connection_info in the answer"}
	}
	t, _ := ci["driver_volume_type"].(string)
	if t != "iscsi" {
		return nil, &Error{Op: "attachment", Message: fmt.Sprintf("driver_volume_type %q: only iscsi volumes can be templates", t)}
	}
	data := ci
	if inner, ok := ci["data"].(map[string]any); ok {
		data = inner
	}
	out := make(map[string]any, len(data))
	for k, v := range data {
		if k != "driver_volume_type" {
			out[k] = v
		}
	}
	if _, err := origin.ParseConnectionInfo(out); err != nil {
		return nil, &Error{Op: "attachment", Message: err.Error()}
	}
	return out, nil
}
