"""Real components for the Python shim tests: tgtd and the sidecar daemon."""

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sidecar_binary():
    path = os.environ.get("VMTHUNDER_BIN") or os.path.join(REPO, "bin", "vmthunder")
    if not os.path.exists(path):
        subprocess.run(["make", "-C", REPO, "build"], check=True)
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, what, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


class Tgtd:
    """A private tgtd serving one file-backed LUN (LUN 1) on a loopback portal."""

    def __init__(self, workdir, size=64 << 20, chap=None):
        self.workdir = workdir
        self.backing = os.path.join(workdir, "lun.img")
        with open(self.backing, "wb") as f:
            f.write(os.urandom(size))
        self.iqn = f"iqn.2026-11.org.vmthunder:test{random.randrange(1 << 30)}"
        self.port = free_port()
        # Other tests run their own tgtd: take a control port whose socket
        # nobody has, and make sure the tgtd answering is ours.
        self.control = random.randrange(20000, 32000)
        while os.path.exists(f"/run/tgtd/socket.{self.control}"):
            self.control = random.randrange(20000, 32000)
        self.log = open(os.path.join(workdir, "tgtd.log"), "wb")
        self.proc = subprocess.Popen(
            ["tgtd", "-f", "-C", str(self.control), "--iscsi", f"portal=127.0.0.1:{self.port}"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_for(
            lambda: self.proc.poll() is not None
            or self._adm("--mode", "sys", "--op", "show", check=False) == 0,
            "tgtd",
        )
        time.sleep(0.2)
        if self.proc.poll() is not None:
            raise RuntimeError(f"tgtd exited: {open(self.log.name).read()}")
        self._adm("--mode", "target", "--op", "new", "--tid", "1", "-T", self.iqn)
        self._adm("--mode", "logicalunit", "--op", "new", "--tid", "1", "--lun", "1", "-b", self.backing)
        self._adm("--mode", "target", "--op", "bind", "--tid", "1", "-I", "ALL")
        if chap:
            user, password = chap
            self._adm("--mode", "account", "--op", "new", "--user", user, "--password", password)
            self._adm("--mode", "account", "--op", "bind", "--tid", "1", "--user", user)

    def _adm(self, *args, check=True):
        r = subprocess.run(
            ["tgtadm", "-C", str(self.control), "--lld", "iscsi", *args], capture_output=True, text=True
        )
        if check and r.returncode != 0:
            raise RuntimeError(f"tgtadm {' '.join(args)}: {r.stderr.strip()}")
        return r.returncode

    def connection_info(self, volume_id, chap=None):
        data = {
            "target_portal": f"127.0.0.1:{self.port}",
            "target_iqn": self.iqn,
            "target_lun": 1,
            "volume_id": volume_id,
            "target_discovered": False,
        }
        if chap:
            data.update(auth_method="CHAP", auth_username=chap[0], auth_password=chap[1])
        return data

    def stop(self):
        self.proc.kill()  # tgtd ignores SIGTERM
        self.proc.wait()
        self.log.close()
        for suffix in ("", ".lock"):
            try:
                os.remove(f"/run/tgtd/socket.{self.control}{suffix}")
            except OSError:
                pass


class Sidecar:
    """`vmthunder daemon` with a private config in a temp dir."""

    def __init__(self, workdir, socket_group="root"):
        self.workdir = workdir
        self.api_socket = os.path.join(workdir, "api.sock")
        self.config = os.path.join(workdir, "vmthunder.conf")
        # Local origin files may be exported from here only (the daemon
        # refuses others with 403 forbidden).
        self.origin_dir = os.path.join(workdir, "origins")
        os.makedirs(self.origin_dir, mode=0o755, exist_ok=True)
        with open(self.config, "w") as f:
            f.write(f"""[DEFAULT]
state_dir = {workdir}/state
api_socket = {self.api_socket}
nbd_socket_dir = {workdir}/nbd
nbd_group = {socket_group}
allowed_origin_dirs = {self.origin_dir}

[cache]
dir = {workdir}/cache
""")
        self.log = open(os.path.join(workdir, "daemon.log"), "wb")
        self.proc = subprocess.Popen(
            [sidecar_binary(), "daemon", "--config", self.config], stdout=self.log, stderr=subprocess.STDOUT
        )
        wait_for(lambda: os.path.exists(self.api_socket) or self.proc.poll() is not None, "sidecar")
        if self.proc.poll() is not None:
            raise RuntimeError(f"sidecar exited: {open(self.log.name).read()}")

    def log_text(self):
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def tempdir(prefix):
    d = tempfile.mkdtemp(prefix=prefix)
    os.chmod(d, 0o755)
    return d


def rmtree(d):
    shutil.rmtree(d, ignore_errors=True)
