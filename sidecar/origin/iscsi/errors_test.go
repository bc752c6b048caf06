package iscsi

import "testing"

func TestLoginCause(t *testing.T) {
	for msg, want := range map[string]error{
		"Failed to log in to target. Status: Authentication failure(513)": ErrAuth,
		"Failed to log in to target. Status: Target not found(515)":       ErrTargetNotFound,
		"Failed to log in to target. Status: Authorization failure(514)":  ErrDenied,
		"Failed to log in to target. Status: Out of resources(1026)":      ErrLogin,
		"something else": ErrLogin,
	} {
		if got := loginCause(msg); got != want {
			t.Errorf("%q: %v, want %v", msg, got, want)
		}
	}
}
