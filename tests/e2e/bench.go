package e2e

import (
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/vmthunder/vmthunder/internal/testbin"
	"github.com/vmthunder/vmthunder/tests/guestimage"
)

// BenchRig is what a boot benchmark starts from: a shared scratch
// directory, the guest image, the sidecar binary and a target serving the
// image.
type BenchRig struct {
	Dir    string
	Image  *guestimage.Image
	Bin    string
	Origin *Origin
}

// NewBenchRig builds the image and starts the target in a new directory
// named after prefix. Close removes it all.
func NewBenchRig(prefix string) (*BenchRig, error) {
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		return nil, err
	}
	r := &BenchRig{Dir: dir}
	if err = MakeShared(dir); err == nil {
		r.Image, err = guestimage.Build(guestimage.Options{Dir: filepath.Join(dir, "image")})
	}
	if err == nil {
		r.Bin, err = testbin.Vmthunder()
	}
	if err == nil {
		r.Origin, err = StartOrigin(r.Image.Root, dir)
	}
	if err != nil {
		r.Close()
		return nil, err
	}
	return r, nil
}

// Close stops the target and removes the directory.
func (r *BenchRig) Close() {
	if r.Origin != nil {
		r.Origin.Stop()
	}
	os.RemoveAll(r.Dir)
}

// Median is the median of d (the mean of the middle two for an even count).
func Median(d []time.Duration) time.Duration {
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
