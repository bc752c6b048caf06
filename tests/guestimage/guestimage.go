// Package guestimage builds the small guest the end-to-end tests and the
// demo boot: an ext4 root made with mkfs.ext4 -d from a staged directory
// (busybox-static, an /sbin/init script and a few hundred files of
// pseudo-random content), plus Debian's kernel and initrd copied next to it
// where QEMU (running as libvirt-qemu) can read them. Nothing is
// downloaded, and the same Options give the same bytes.
//
// The guest's init reads a fixed subset of the files the way a boot reads
// its working set, writes a little (a file in the filesystem and one block
// at WriteOffset, outside the filesystem, so a test can look for it in the
// base without parsing ext4), prints
//
//	VMTHUNDER-BOOT-OK nonce=N bytes=B
//
// on the serial console and powers off.
package guestimage

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// Marker starts the console line a guest prints when its boot is done.
const Marker = "VMTHUNDER-BOOT-OK"

// WriteMarker starts the block the guest writes at WriteOffset.
const WriteMarker = "VMTHUNDER-WRITE"

// Options say what to build. The zero value is the default image.
type Options struct {
	Dir   string // output directory (made 0755 so libvirt-qemu can read it)
	Size  int64  // image size; default 512 MiB
	Files int    // data files; default 320 (about 38 MB)
	Seed  uint64 // content seed; default 1
	// KernelVersion picks /boot/vmlinuz-V and /boot/initrd.img-V; empty:
	// the newest pair found in /boot.
	KernelVersion string
}

// Image is a built guest.
type Image struct {
	Dir    string
	Root   string // the raw ext4 image
	Kernel string
	Initrd string
	Size   int64
	// DataBytes is the content of all data files; BootReadBytes what one
	// boot's init reads of it (the guest prints the figure it read).
	DataBytes     int64
	BootReadBytes int64
	// WriteOffset is where the guest writes one 4 KiB block naming its
	// nonce; it lies past the end of the filesystem.
	WriteOffset int64
	SHA256      string // of Root as built
}

const (
	defaultSize  = 512 << 20
	defaultFiles = 320
	tailReserve  = 16 << 20 // past the filesystem: the guest's raw write lands here
)

// Build makes the image in o.Dir (created if needed).
func Build(o Options) (*Image, error) {
	if o.Size == 0 {
		o.Size = defaultSize
	}
	if o.Files == 0 {
		o.Files = defaultFiles
	}
	if o.Seed == 0 {
		o.Seed = 1
	}
	if o.Dir == "" {
		return nil, fmt.Errorf("guestimage: no output directory")
	}
	if o.Size < 64<<20 || o.Size%(1<<20) != 0 {
		return nil, fmt.Errorf("guestimage: size %d must be a multiple of 1 MiB and at least 64 MiB", o.Size)
	}
	for _, tool := range []string{"mkfs.ext4", "debugfs"} {
		if _, err := exec.LookPath(tool); err != nil {
			return nil, fmt.Errorf("guestimage: %s not found (Debian package e2fsprogs): %w", tool, err)
		}
	}
	busybox, err := findBusybox()
	if err != nil {
		return nil, err
	}
	kernel, initrd, err := findKernel(o.KernelVersion)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(o.Dir, 0o755); err != nil {
		return nil, err
	}
	// QEMU runs as libvirt-qemu: every directory on the way must be traversable.
	if err := os.Chmod(o.Dir, 0o755); err != nil {
		return nil, err
	}
	img := &Image{
		Dir:         o.Dir,
		Root:        filepath.Join(o.Dir, "root.img"),
		Kernel:      filepath.Join(o.Dir, "vmlinuz"),
		Initrd:      filepath.Join(o.Dir, "initrd.img"),
		Size:        o.Size,
		WriteOffset: o.Size - tailReserve/2,
	}
	if err := copyFile(kernel, img.Kernel); err != nil {
		return nil, err
	}
	if err := copyFile(initrd, img.Initrd); err != nil {
		return nil, err
	}
	stage, err := os.MkdirTemp(o.Dir, "stage-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(stage)
	if err := img.stage(stage, busybox, o); err != nil {
		return nil, err
	}
	if err := img.mkfs(stage); err != nil {
		return nil, err
	}
	sum, err := FileSHA256(img.Root)
	if err != nil {
		return nil, err
	}
	img.SHA256 = sum
	return img, nil
}

// Cmdline is the kernel command line for one boot. nonce names the boot
// in what the guest prints and writes ([A-Za-z0-9-] only).
func (img *Image) Cmdline(nonce string) string {
	// fastboot: the initrd skips fsck, which would read the whole
	// filesystem's metadata and is not what a cloud image's boot does.
	return "root=/dev/vda rw console=ttyS0 init=/sbin/init quiet fastboot panic=-1 vmthunder.nonce=" + nonce
}

// xorshift is a small deterministic PRNG: the content must be the same for
// one seed on every machine and Go version (math/rand/v2 streams are
// stable, but this keeps the format ours).
type xorshift uint64

func (x *xorshift) next() uint64 {
	v := uint64(*x)
	v ^= v << 13
	v ^= v >> 7
	v ^= v << 17
	*x = xorshift(v)
	return v
}

func (img *Image) stage(dir, busybox string, o Options) error {
	for _, d := range []string{"bin", "sbin", "etc", "dev", "proc", "sys", "run", "tmp", "var/lib", "var/tmp", "usr/share/data", "root", "mnt"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return err
		}
	}
	if err := copyFile(busybox, filepath.Join(dir, "bin/busybox")); err != nil {
		return err
	}
	if err := os.Chmod(filepath.Join(dir, "bin/busybox"), 0o755); err != nil {
		return err
	}
	// Only the applets init uses, so the image does not depend on the
	// host busybox's applet list.
	for _, a := range []string{"sh", "mount", "umount", "cat", "wc", "dd", "echo", "printf", "sync", "poweroff",
		"head", "sleep", "mkdir", "ls", "xargs", "tr", "date", "rm"} {
		if err := os.Symlink("busybox", filepath.Join(dir, "bin", a)); err != nil {
			return err
		}
	}

	// Data files: sizes from 4 KiB to 512 KiB, skewed small like the files
	// of an OS image, in nested directories.
	rng := xorshift(o.Seed*0x9e3779b97f4a7c15 | 1)
	var boot []string
	buf := make([]byte, 512<<10)
	for i := 0; i < o.Files; i++ {
		sub := fmt.Sprintf("usr/share/data/d%02d", i%16)
		if err := os.MkdirAll(filepath.Join(dir, sub), 0o755); err != nil {
			return err
		}
		shift := 12 + rng.next()%8 // 4 KiB .. 512 KiB ceilings
		size := int64(1<<shift) - int64(rng.next()%uint64(1<<(shift-1)))
		for j := int64(0); j < size; j += 8 {
			v := rng.next()
			for k := int64(0); k < 8 && j+k < size; k++ {
				buf[j+k] = byte(v >> (8 * k))
			}
		}
		name := fmt.Sprintf("%s/f%04d.bin", sub, i)
		if err := os.WriteFile(filepath.Join(dir, name), buf[:size], 0o644); err != nil {
			return err
		}
		img.DataBytes += size
		// A boot reads about half the files: a fixed choice by index.
		if (i*7)%13 < 6 {
			boot = append(boot, "/"+name)
			img.BootReadBytes += size
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "etc/boot-files"), []byte(strings.Join(boot, "\n")+"\n"), 0o644); err != nil {
		return err
	}
	seek := img.WriteOffset / 4096
	conf := fmt.Sprintf("WRITE_SEEK=%d\nBOOT_READ_BYTES=%d\n", seek, img.BootReadBytes)
	if err := os.WriteFile(filepath.Join(dir, "etc/vmthunder.conf"), []byte(conf), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "etc/hostname"), []byte("vmthunder-guest\n"), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "sbin/init"), []byte(initScript), 0o755); err != nil {
		return err
	}
	// Fixed times so mkfs copies the same inode times every build.
	fixed := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	return filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil || fi.Mode()&os.ModeSymlink != 0 {
			return err
		}
		return os.Chtimes(p, fixed, fixed)
	})
}

// initScript is the guest's /sbin/init (busybox sh, PID 1).
const initScript = `#!/bin/sh
export PATH=/bin
# The initrd may have moved its own mounts here already.
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sys /sys 2>/dev/null
mount -t devtmpfs dev /dev 2>/dev/null
. /etc/vmthunder.conf
nonce=none
for w in $(cat /proc/cmdline); do
  case "$w" in vmthunder.nonce=*) nonce="${w#vmthunder.nonce=}" ;; esac
done
echo "VMTHUNDER-INIT nonce=$nonce"
# The boot's working set: read every listed file once.
bytes=$(xargs cat < /etc/boot-files | wc -c)
# Writes: a file in the filesystem and one raw block past its end.
mkdir -p /var/lib/vmthunder
echo "$nonce" > /var/lib/vmthunder/boot-$nonce
head -c 1048576 /dev/urandom > /var/tmp/scratch
printf 'VMTHUNDER-WRITE %s\n' "$nonce" | dd of=/dev/vda bs=4096 seek=$WRITE_SEEK conv=sync,fsync 2>/dev/null
sync
# Read-only before power-off so every write is in place, not only in the journal.
mount -o remount,ro / 2>/dev/null
sync
echo "VMTHUNDER-BOOT-OK nonce=$nonce bytes=$bytes"
poweroff -f
sleep 60
`

func (img *Image) mkfs(stage string) error {
	f, err := os.Create(img.Root)
	if err != nil {
		return err
	}
	if err := f.Truncate(img.Size); err != nil {
		f.Close()
		return err
	}
	f.Close()
	fsKiB := (img.Size - tailReserve) >> 10
	cmd := exec.Command("mkfs.ext4", "-F", "-q", "-L", "vmtroot", "-m", "0",
		"-U", "5f0c8d1e-6a49-4c1b-9d7e-2b3c4d5e6f70",
		"-E", "lazy_itable_init=0,lazy_journal_init=0,hash_seed=2f9a4b61-0c3d-4e5f-8a7b-6c5d4e3f2a10,root_owner=0:0",
		"-d", stage, img.Root, fmt.Sprintf("%dk", fsKiB))
	// A fixed clock for the superblock's times: the same image every build.
	cmd.Env = append(os.Environ(), "E2FSPROGS_FAKE_TIME=1767225600")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("mkfs.ext4: %v: %s", err, out)
	}
	// mkfs copies each file's ctime, which no one can set on the host:
	// pin them afterwards, or two builds would differ.
	var cmds strings.Builder
	err = filepath.Walk(stage, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel := strings.TrimPrefix(p, stage)
		if rel == "" {
			rel = "/"
		}
		for _, f := range []string{"ctime", "atime", "mtime", "crtime"} {
			fmt.Fprintf(&cmds, "set_inode_field %s %s 20260101000000\n", rel, f)
		}
		return nil
	})
	if err != nil {
		return err
	}
	for _, f := range []string{"ctime", "atime", "mtime", "crtime"} {
		fmt.Fprintf(&cmds, "set_inode_field /lost+found %s 20260101000000\n", f)
	}
	dbg := exec.Command("debugfs", "-w", "-f", "-", img.Root)
	dbg.Stdin = strings.NewReader(cmds.String())
	dbg.Env = cmd.Env
	if out, err := dbg.CombinedOutput(); err != nil {
		return fmt.Errorf("debugfs: %v: %s", err, out)
	}
	return os.Chmod(img.Root, 0o644)
}

func findBusybox() (string, error) {
	for _, p := range []string{"/bin/busybox", "/usr/bin/busybox"} {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		// A dynamic busybox has an interpreter path; the guest has no libc.
		if bytes.Contains(b[:min(len(b), 4096)], []byte("/lib64/ld-linux")) {
			return "", fmt.Errorf("guestimage: %s is dynamically linked; install busybox-static", p)
		}
		return p, nil
	}
	return "", fmt.Errorf("guestimage: no busybox found; install busybox-static")
}

func findKernel(version string) (kernel, initrd string, err error) {
	if version != "" {
		return "/boot/vmlinuz-" + version, "/boot/initrd.img-" + version, nil
	}
	ks, _ := filepath.Glob("/boot/vmlinuz-*")
	sort.Strings(ks)
	for i := len(ks) - 1; i >= 0; i-- {
		v := strings.TrimPrefix(ks[i], "/boot/vmlinuz-")
		if _, err := os.Stat("/boot/initrd.img-" + v); err == nil {
			return ks[i], "/boot/initrd.img-" + v, nil
		}
	}
	return "", "", fmt.Errorf("guestimage: no /boot/vmlinuz-V with /boot/initrd.img-V (Debian package linux-image-amd64)")
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// FileSHA256 is the hex SHA-256 of a file.
func FileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// ReadWriteBlock returns the text of the block the guest writes at
// WriteOffset in the given copy of the image (the base LUN's backing file,
// a COW export's view), trimmed at the first NUL or newline.
func (img *Image) ReadWriteBlock(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	b := make([]byte, 4096)
	if _, err := f.ReadAt(b, img.WriteOffset); err != nil {
		return "", err
	}
	if i := bytes.IndexAny(b, "\x00\n"); i >= 0 {
		b = b[:i]
	}
	return string(b), nil
}
