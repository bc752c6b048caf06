package peers

import (
	"bytes"
	"io"
	"slices"
	"time"

	"github.com/hashicorp/memberlist"
)

// memberlist v0.7.0 keeps each member's state (alive, suspect, dead, left)
// to itself: Node.State is never filled in and no event marks a suspicion.
// What it does tell, and what this file turns into Member.State:
//   - a failed probe of a member by this node: memberlist logs "Suspect
//     NAME has failed, no acks received" just before it marks the member
//     suspect (the log line is the only hook); the member is suspect here
//     until one of this node's probes is acked again (PingDelegate), new
//     metadata or a rejoin arrives, or memberlist declares it dead;
//   - dead or left: NotifyLeave (membership.go), told apart by the
//     member's own metadata.
// Members suspected only by other nodes go from alive to dead here.

// suspicionLog passes memberlist's log on and watches it for this node's
// own suspicions.
type suspicionLog struct {
	m   *Membership
	out io.Writer
}

var (
	suspectPrefix = []byte("memberlist: Suspect ")
	suspectSuffix = []byte(" has failed, no acks received")
)

func (w suspicionLog) Write(p []byte) (int, error) {
	if name, ok := suspectedIn(p); ok {
		w.m.suspect(name, time.Now())
	}
	return w.out.Write(p)
}

// suspectedIn finds the member a memberlist log line suspects.
func suspectedIn(line []byte) (string, bool) {
	i := bytes.Index(line, suspectPrefix)
	if i < 0 {
		return "", false
	}
	rest := line[i+len(suspectPrefix):]
	j := bytes.Index(rest, suspectSuffix)
	if j <= 0 {
		return "", false
	}
	return string(rest[:j]), true
}

// suspect marks a live member suspect.
func (m *Membership) suspect(name string, now time.Time) {
	m.setLive(name, StateAlive, StateSuspect, now)
}

// setLive moves member name from state from to state to.
func (m *Membership) setLive(name, from, to string, now time.Time) {
	m.mu.Lock()
	mb, ok := m.view[name]
	if !ok || mb.State != from || name == m.self {
		m.mu.Unlock()
		return
	}
	mb.State, mb.Since = to, now
	m.view[name] = mb
	(*eventDelegate)(m).stateChanged(mb, from)
	fs := slices.Clone(m.onChange)
	m.mu.Unlock()
	(*eventDelegate)(m).notify(fs)
}

// pingDelegate hears of this node's probes that were acked: a suspect
// member that answers is alive again.
type pingDelegate Membership

func (p *pingDelegate) AckPayload() []byte { return nil }

func (p *pingDelegate) NotifyPingComplete(other *memberlist.Node, _ time.Duration, _ []byte) {
	(*Membership)(p).setLive(other.Name, StateSuspect, StateAlive, time.Now())
}

// forget drops the members that died or left more than forgetAfter ago.
func (m *Membership) forget(every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-m.stop:
			return
		case now := <-t.C:
			m.forgetBefore(now.Add(-m.forgetAfter))
		}
	}
}

func (m *Membership) forgetBefore(cut time.Time) {
	m.mu.Lock()
	n := len(m.view)
	for name, mb := range m.view {
		if !mb.Live() && mb.Since.Before(cut) {
			delete(m.view, name)
		}
	}
	changed := len(m.view) != n
	fs := slices.Clone(m.onChange)
	m.mu.Unlock()
	if changed {
		(*eventDelegate)(m).notify(fs)
	}
}

func (m *Membership) stopWatch() { m.stopOnce.Do(func() { close(m.stop) }) }
