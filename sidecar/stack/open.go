package stack

import (
	"fmt"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"github.com/vmthunder/vmthunder/sidecar/layer/cow"
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

// ProbeSize is the origin's current size (opened read-only, then closed).
func ProbeSize(spec origin.Spec) (int64, error) {
	spec.ReadOnly = true
	d, err := OpenOrigin(spec)
	if err != nil {
		return 0, err
	}
	defer d.Close()
	return d.Size(), nil
}

// RemoveCOW deletes an export's copy-on-write store (its data and bitmap);
// refused while the store is open.
func RemoveCOW(path string) error { return cow.Remove(path) }
