package bulk

import (
	"fmt"
	"net"
	"time"

	"github.com/vmthunder/vmthunder/tests/e2e"
)

// Origin is tgtd serving the guest image as LUN 1 in the origin's
// namespace, reached at OriginIP:3260 through a relay (in the same
// namespace) that delays what the target sends by the run's delay (this
// kernel has no sch_netem) and counts it: Sent is the origin's bytes.
type Origin struct {
	*e2e.Target
	Host  *Host
	Addr  string // OriginIP:3260, the relay
	relay *e2e.Meter
}

// StartOrigin serves a sparse copy of image from tgtd inside host's
// namespace.
func StartOrigin(host *Host, image, dir string, delay time.Duration) (*Origin, error) {
	t, err := e2e.StartTarget(image, dir, host.Exec)
	if err != nil {
		return nil, err
	}
	o := &Origin{Target: t, Host: host, Addr: net.JoinHostPort(host.IP, "3260")}
	var ln net.Listener
	if err := host.Do(func() (err error) { ln, err = net.Listen("tcp", o.Addr); return }); err != nil {
		t.Stop()
		return nil, err
	}
	dial := func() (c net.Conn, err error) {
		err = host.Do(func() error { c, err = net.Dial("tcp", t.Portal); return err })
		return c, err
	}
	o.relay = e2e.NewRelay(ln, dial, delay)
	return o, nil
}

// URL is the LUN's iscsi:// URL at the relay.
func (o *Origin) URL() string { return fmt.Sprintf("iscsi://%s/%s/%d", o.Addr, o.IQN, o.LUN) }

// Sent is the bytes the target has sent so far, through the relay.
func (o *Origin) Sent() int64 { return o.relay.Sent() }

// Stop closes the relay and stops the target.
func (o *Origin) Stop() {
	o.relay.Close()
	o.Target.Stop()
}
