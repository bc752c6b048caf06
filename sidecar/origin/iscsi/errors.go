package iscsi

import (
	"errors"
	"regexp"
	"strconv"
)

// Errors that name their cause; test them with errors.Is. Transport
// errors also wrap the syscall errno when one is known
// (syscall.ECONNREFUSED, ...).
var (
	// ErrAuth: the target refused our CHAP credentials (or has none for us).
	ErrAuth = errors.New("iscsi login failed: authentication")
	// ErrDenied: the target does not let this initiator in (its ACL),
	// whatever the credentials.
	ErrDenied = errors.New("iscsi login failed: initiator not authorized")
	// ErrTargetNotFound: no target with that IQN on the portal.
	ErrTargetNotFound = errors.New("iscsi target not found")
	// ErrNoLUN: the target has no such LUN.
	ErrNoLUN = errors.New("iscsi LUN not found")
	// ErrUnreachable: no TCP connection to the portal (refused, no route,
	// name not resolved).
	ErrUnreachable = errors.New("iscsi portal unreachable")
	// ErrTimeout: a connect, login or command did not finish in time.
	ErrTimeout = errors.New("iscsi timeout")
	// ErrLogin: a login failure other than the ones above.
	ErrLogin = errors.New("iscsi login failed")
	// ErrSCSI: the target answered a command with an error (CHECK
	// CONDITION or a bad status); the message has the sense data.
	ErrSCSI = errors.New("iscsi command failed")
	// ErrConnection: an established session dropped.
	ErrConnection = errors.New("iscsi connection lost")
	// ErrClosed: the device is closed.
	ErrClosed = errors.New("iscsi device closed")
)

// iSCSI login status classes and details (RFC 7143 11.13.5), as libiscsi
// prints them: "... Status: Authentication failure(513)".
var loginStatusRE = regexp.MustCompile(`Status: [^(]*\((\d+)\)`)

func loginCause(msg string) error {
	m := loginStatusRE.FindStringSubmatch(msg)
	if m == nil {
		return ErrLogin
	}
	code, _ := strconv.Atoi(m[1])
	switch code {
	case 0x0201: // authentication failure
		return ErrAuth
	case 0x0202: // authorization failure: an ACL, not the CHAP secret
		return ErrDenied
	case 0x0203, 0x0204: // not found, target removed
		return ErrTargetNotFound
	}
	return ErrLogin
}
