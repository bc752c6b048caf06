package cow

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmthunder/vmthunder/sidecar/layer/cache/pbitmap"
)

// A damaged cluster size in an existing store's header is refused with a
// clear error, before anything is sized by it.
func TestCorruptClusterSize(t *testing.T) {
	for _, bad := range []int64{1 << 62, 2 << 20, 5000, 256} {
		t.Run(fmt.Sprint(bad), func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "vm.cow")
			b := base(4096)
			d := open(t, path, b)
			d.WriteAt([]byte("x"), 0)
			d.Close()
			bm := path + ".bitmap"
			f, err := os.OpenFile(bm, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			var v [8]byte
			binary.LittleEndian.PutUint64(v[:], uint64(bad))
			f.WriteAt(v[:], pbitmap.UnitSizeOffset)
			f.Close()
			d, err = func() (d *Dev, err error) {
				defer func() {
					if p := recover(); p != nil {
						err = fmt.Errorf("panic: %v", p)
					}
				}()
				return Open(path, b, Options{})
			}()
			if err == nil {
				d.Close()
				t.Fatal("a store with a damaged cluster size opened")
			}
			if !errors.Is(err, ErrMismatch) || !errors.Is(err, pbitmap.ErrFormat) ||
				!strings.Contains(err.Error(), bm) || !strings.Contains(err.Error(), fmt.Sprint(bad)) {
				t.Fatalf("damaged cluster size %d: %v", bad, err)
			}
		})
	}
}
