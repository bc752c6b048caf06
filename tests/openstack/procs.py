"""Process plumbing shared by the control-plane harness: ports, waits, and
stopping what a workdir started (found by pid and by the workdir in argv)."""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# How long each service may take to come up. Generous: on a loaded 2-core
# machine (load average 16) one start took two minutes.
START_TIMEOUT = float(os.environ.get("VMTHUNDER_OPENSTACK_START_TIMEOUT", "300"))


def wait_for(pred, what, timeout=START_TIMEOUT, interval=0.2, check=None):
    """Polls pred until it is true; check() is called between polls and may
    raise (a service that died) so a dead start fails at once."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return
        if check:
            check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def port_open(port, host="127.0.0.1"):
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def http(method, url, body=None, headers=None, timeout=120):
    """One JSON request; returns (status, decoded body or text)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


def spawn(argv, log_path, env=None, cwd=None):
    """Starts a service in its own session, so it outlives `up` and its whole
    process group can be stopped by `down`."""
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    finally:
        log.close()


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            # A zombie has exited; only its parent's wait is missing.
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def pids_mentioning(needle):
    """Processes whose command line or environment contains needle (the
    workdir), or whose working directory is under it: helpers that left the process group (privsep
    daemons), and everything `up` started when its state file is gone."""
    found = []
    mine = _ancestors()  # the caller's own command line may name the workdir
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in mine:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(f"/proc/{entry}/cwd")
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().decode(errors="replace")
        except OSError:
            continue
        # epmd keeps RabbitMQ's environment (which names the workdir), nothing else.
        if needle in cmd or (cwd + "/").startswith(needle) or ("epmd" in cmd and needle in env):
            found.append(int(entry))
    return found


def _ancestors():
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            break
    return pids


def stop_group(pid, timeout=15.0, sig=signal.SIGTERM):
    """Signals pid's process group (a session leader's) and waits for it to go;
    SIGKILL after timeout."""
    for s in (sig, signal.SIGKILL):
        try:
            os.killpg(pid, s)
        except ProcessLookupError:
            return
        except PermissionError:
            os.kill(pid, s)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _reap(pid)
            if not alive(pid) and not _group_alive(pid):
                return
            time.sleep(0.1)


def stop_pids(pids, timeout=10.0):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        for p in pids:
            _reap(p)
        time.sleep(0.1)
    for pid in pids:
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _reap(pid)


def _reap(pid):
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _group_alive(pgid):
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False
