"""Real components for the functional tests and `make demo --openstack`:
the test guest, a Cinder (tests/openstack), a sidecar daemon configured for
it, and template publishing with the sidecar's own `vmthunder publish`.

Nothing here fakes a service: the Cinder is tests/openstack's (cinder-api,
-scheduler, -volume over RabbitMQ and tgtd), the sidecar is the built
binary, QEMU runs under the system libvirtd.
"""

import grp
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
# tests.openstack from the repository. The shims are tested as installed
# (tests/python.sh installs them first), or from this tree with
# VMTHUNDER_TEST_SOURCE=1.
_paths = [REPO]
if os.environ.get("VMTHUNDER_TEST_SOURCE"):
    _paths += [os.path.join(REPO, "cinder-connector"), os.path.join(REPO, "nova-plugin")]
for path in _paths:
    if path not in sys.path:
        sys.path.insert(0, path)

from vmthunder_brick import SidecarClient  # noqa: E402


def sidecar_binary(workdir):
    """$VMTHUNDER_BIN, else one built into workdir (bin/vmthunder may be
    rebuilt by anyone at any time)."""
    if os.environ.get("VMTHUNDER_BIN"):
        return os.environ["VMTHUNDER_BIN"]
    path = os.path.join(workdir, "vmthunder")
    subprocess.run(["go", "build", "-o", path, "./sidecar/cmd/vmthunder"], cwd=REPO, check=True)
    return path


def qemu_group():
    """The group libvirt's QEMU runs in (Debian: libvirt-qemu), for the
    NBD sockets."""
    for name in ("libvirt-qemu", "kvm"):
        try:
            grp.getgrnam(name)
            return name
        except KeyError:
            pass
    return "root"


def build_guest(workdir, seed=0):
    """tests/guestimage's guest, built by tests/demo/imagebuild: a dict
    with root, kernel, initrd, size, boot_read_bytes, write_offset,
    marker, cmdline."""
    out = subprocess.run(
        ["go", "run", "./tests/demo/imagebuild", "-dir", workdir, "-seed", str(seed)],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)


def wait_for(pred, what, timeout=60.0, interval=0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


class Sidecar:
    """`vmthunder daemon` whose [cinder] section names the test Cinder and
    whose allowed_cow_dirs is Nova's instances directory."""

    def __init__(self, workdir, instances_path, cloud, binary=None):
        self.workdir = workdir
        self.binary = binary or sidecar_binary(workdir)
        self.api_socket = os.path.join(workdir, "api.sock")
        self.nbd_dir = os.path.join(workdir, "nbd")
        self.config = os.path.join(workdir, "vmthunder.conf")
        self.cloud = cloud
        with open(self.config, "w") as f:
            f.write(f"""[DEFAULT]
state_dir = {workdir}/state
api_socket = {self.api_socket}
nbd_socket_dir = {self.nbd_dir}
nbd_group = {qemu_group()}
allowed_cow_dirs = {instances_path}

[cache]
dir = {workdir}/cache

[cinder]
auth_strategy = noauth
endpoint = {cloud["endpoint"]}
project_id = {cloud["project_id"]}
template_volume_type = {cloud["template_volume_type"]}
host = vmthunder-functional
""")
        self.log = open(os.path.join(workdir, "daemon.log"), "ab")
        self.proc = None
        self.client = SidecarClient(socket_path=self.api_socket, timeout=300)

    def start(self):
        self.proc = subprocess.Popen(
            [self.binary, "daemon", "--config", self.config], stdout=self.log, stderr=subprocess.STDOUT
        )
        wait_for(lambda: os.path.exists(self.api_socket) or self.proc.poll() is not None, "the sidecar")
        if self.proc.poll() is not None:
            raise RuntimeError(f"sidecar exited {self.proc.returncode}: {self.log_text()[-3000:]}")
        return self

    def log_text(self):
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def publish(self, path, name, image_id):
        """`vmthunder publish --file` into the test Cinder; answers the
        template as GET /v1/templates lists it."""
        r = subprocess.run(
            [
                self.binary,
                "publish",
                "--config",
                self.config,
                "--file",
                path,
                "--name",
                name,
                "--image-id",
                image_id,
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if r.returncode != 0:
            raise RuntimeError(
                f"vmthunder publish {name}: {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
            )
        templates = self.client.templates(image_id=image_id)
        if not templates:
            raise RuntimeError(
                f"published {name} for image {image_id}, but the sidecar lists no template of it"
            )
        return templates[0]

    def sockets(self):
        try:
            return sorted(n for n in os.listdir(self.nbd_dir) if n.endswith(".sock"))
        except FileNotFoundError:
            return []


def cinder_get(cloud, path):
    """GET on the test Cinder's API (noauth token, microversion 3.54)."""
    req = urllib.request.Request(
        cloud["endpoint"] + path,
        headers={
            "X-Auth-Token": cloud["token"],
            "OpenStack-API-Version": f"volume {cloud.get('api_version', '3.54')}",
            "Accept": "application/json",
        },
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def volume_attachments(cloud, volume_id):
    return cinder_get(cloud, f"/volumes/{volume_id}")["volume"].get("attachments", [])


def console_log(instances_path, uuid):
    try:
        with open(os.path.join(instances_path, uuid, "console.log"), errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""
