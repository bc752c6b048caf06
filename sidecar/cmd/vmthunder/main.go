// Command vmthunder is the VMThunder sidecar: the daemon and its CLI in one
// binary. Each subcommand lives in its own file and registers itself; this
// file only dispatches.
package main

import (
	"fmt"
	"os"
	"sort"
)

type command struct {
	summary string
	run     func(args []string) error
}

var commands = map[string]command{}

func register(name, summary string, run func(args []string) error) {
	commands[name] = command{summary: summary, run: run}
}

func usage() {
	fmt.Fprintf(os.Stderr, "usage: vmthunder [global flags] COMMAND [flags] [args]\n\ncommands:\n")
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(os.Stderr, "  %-10s %s\n", n, commands[n].summary)
	}
	fmt.Fprintf(os.Stderr, "\nRun 'vmthunder COMMAND -h' for a command's flags.\n")
}

func main() {
	args := globalFlags(os.Args[1:])
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage()
		if len(args) == 0 {
			os.Exit(2)
		}
		return
	}
	cmd, ok := commands[args[0]]
	if !ok {
		fmt.Fprintf(os.Stderr, "vmthunder: unknown command %q\n\n", args[0])
		usage()
		os.Exit(2)
	}
	if err := cmd.run(args[1:]); err != nil {
		fmt.Fprintf(os.Stderr, "vmthunder %s: %v\n", args[0], err)
		os.Exit(1)
	}
}

// apiSocket is the daemon's API socket, set by the global --socket flag.
var apiSocket = envOr("VMTHUNDER_SOCKET", "/run/vmthunder/api.sock")

// globalFlags consumes flags placed before the command name.
func globalFlags(args []string) []string {
	for len(args) > 0 {
		switch a := args[0]; {
		case a == "--socket" && len(args) > 1:
			apiSocket, args = args[1], args[2:]
		case len(a) > 9 && a[:9] == "--socket=":
			apiSocket, args = a[9:], args[1:]
		default:
			return args
		}
	}
	return args
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}
