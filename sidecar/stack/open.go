package stack

import (
	"fmt"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"github.com/vmthunder/vmthunder/sidecar/origin"
	"github.com/vmthunder/vmthunder/sidecar/origin/file"
	"github.com/vmthunder/vmthunder/sidecar/origin/iscsi"
)

// OpenOrigin opens the device spec names: a local file or block device,
// or an iSCSI LUN read in user space.
func OpenOrigin(spec origin.Spec) (blockdev.Device, error) {
	p, err := spec.Parse()
	if err != nil {
		return nil, err
	}
	switch p.Kind {
	case origin.KindISCSI:
		d, err := iscsi.Open(p.ISCSI)
		if err != nil {
			return nil, err
		}
		return d, nil
	case origin.KindPath:
		return file.Open(p.Path, spec.ReadOnly)
	}
	return nil, fmt.Errorf("%w: unknown origin kind", origin.ErrBadSpec)
}
