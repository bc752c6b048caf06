"""The test control plane itself: real volumes, attachments and bytes over
real iSCSI (with Cinder's CHAP), volumes made from Glance images, and a
teardown that leaves nothing behind."""

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid

import pytest

from tests.openstack import cinder, procs

MiB = 1 << 20
CONNECTOR = {
    "initiator": "iqn.2026-12.org.vmthunder:harness-test",
    "ip": "127.0.0.1",
    "host": "harness-test",
    "platform": "x86_64",
    "os_type": "linux",
    "multipath": False,
}


class Api:
    def __init__(self, info):
        self.info = info
        self.headers = {
            "X-Auth-Token": info["token"],
            "OpenStack-API-Version": f"volume {info['api_version']}",
        }

    def __call__(self, method, path, body=None, want=None):
        status, out = procs.http(method, self.info["endpoint"] + path, body, self.headers)
        if want is not None:
            assert status == want, f"{method} {path}: {status} {out}"
        return out

    def wait_volume(self, vid, status="available", timeout=procs.START_TIMEOUT):
        deadline = time.monotonic() + timeout
        while True:
            vol = self("GET", f"/volumes/{vid}", want=200)["volume"]
            if vol["status"] == status:
                return vol
            assert vol["status"] not in ("error", "error_deleting"), vol
            assert time.monotonic() < deadline, f"volume {vid} still {vol['status']}"
            time.sleep(0.3)

    def create_volume(self, **extra):
        body = {"size": 1, "name": f"harness-{uuid.uuid4().hex[:8]}", **extra}
        vid = self("POST", "/volumes", {"volume": body}, want=202)["volume"]["id"]
        return self.wait_volume(vid)

    def attach(self, vid, mode="rw", connector=CONNECTOR):
        """Attachment with a connector, then os-complete as a host does once
        connected (until then the volume stays 'attaching' and takes no other)."""
        body = {"attachment": {"volume_uuid": vid, "connector": connector, "mode": mode}}
        att = self("POST", "/attachments", body, want=200)["attachment"]
        self("POST", f"/attachments/{att['id']}/action", {"os-complete": None}, want=204)
        return att

    def delete_volume(self, vid):
        self("DELETE", f"/volumes/{vid}", want=202)
        deadline = time.monotonic() + procs.START_TIMEOUT
        while procs.http("GET", f"{self.info['endpoint']}/volumes/{vid}", None, self.headers)[0] != 404:
            assert time.monotonic() < deadline, f"volume {vid} not deleted"
            time.sleep(0.3)


@pytest.fixture
def api(openstack):
    return Api(openstack)


class Lun:
    """qemu-img/qemu-io access to an attachment's LUN with its CHAP secret."""

    def __init__(self, conn, tmp_path):
        assert conn["auth_method"] == "CHAP"
        self.secret = tmp_path / "chap"
        self.secret.write_text(conn["auth_password"])
        self.obj = f"secret,id=chap,file={self.secret}"
        self.opts = (
            f"driver=raw,file.driver=iscsi,file.transport=tcp,file.portal={conn['target_portal']},"
            f"file.target={conn['target_iqn']},file.lun={conn['target_lun']},"
            f"file.user={conn['auth_username']},file.password-secret=chap"
        )
        self.conn = conn

    def write(self, offset, src):
        r = subprocess.run(
            ["qemu-io", "--object", self.obj, "--image-opts", self.opts,
             "-c", f"write -s {src} {offset} {os.path.getsize(src)}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 0 and "wrote" in r.stdout, r.stdout + r.stderr

    def size(self):
        r = subprocess.run(
            ["qemu-img", "info", "--output=json", "--object", self.obj, "--image-opts", self.opts],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["virtual-size"]

    def read(self, offset, length, tmp_path):
        # qemu-img dd counts MiB blocks and cannot skip on this driver (it
        # says so yet exits 0): read from 0 and check the length.
        out = tmp_path / f"read-{offset}-{length}"
        end = offset + length
        r = subprocess.run(
            ["qemu-img", "dd", "--object", self.obj, "--image-opts", "-O", "raw", "bs=1M",
             f"count={-(-end // MiB)}", f"if={self.opts}", f"of={out}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        got = out.read_bytes()
        assert len(got) >= end, f"read {len(got)} bytes of {end}: {r.stderr}"
        return got[offset:end]


def targets(info):
    r = subprocess.run(
        ["tgtadm", "-C", str(info["tgtd_control_port"]), "--lld", "iscsi",
         "--mode", "target", "--op", "show"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return r.stdout


def test_attachment_gives_a_chap_iscsi_lun_with_the_volume_bytes(api, openstack, tmp_path):
    vol = api.create_volume(volume_type=openstack["template_volume_type"])
    assert vol["multiattach"] is True
    att = api.attach(vol["id"])
    conn = att["connection_info"]
    assert conn["driver_volume_type"] == "iscsi"
    assert conn["target_portal"] == openstack["iscsi_portal"]
    assert conn["volume_id"] == vol["id"]
    assert conn["auth_username"] and conn["auth_password"]
    assert conn["target_iqn"] in targets(openstack)

    data = os.urandom(2 * MiB)
    src = tmp_path / "data"
    src.write_bytes(data)
    lun = Lun(conn, tmp_path)
    assert lun.size() == 1 << 30
    lun.write(3 * MiB, src)
    assert lun.read(3 * MiB, 2 * MiB, tmp_path) == data
    # The LUN is this volume's file in the backend, not some other storage.
    with open(os.path.join(openstack["workdir"], "cinder", "volumes", f"volume-{vol['id']}"), "rb") as f:
        f.seek(3 * MiB)
        assert f.read(2 * MiB) == data

    # Cinder's CHAP is enforced: no login without it, nor with a wrong secret.
    url = f"iscsi://{conn['target_portal']}/{conn['target_iqn']}/{conn['target_lun']}"
    assert subprocess.run(["iscsi-inq", url], capture_output=True, timeout=30).returncode != 0
    bad = url.replace("iscsi://", f"iscsi://{conn['auth_username']}%wrong-secret@")
    assert subprocess.run(["iscsi-inq", bad], capture_output=True, timeout=30).returncode != 0
    good = url.replace("iscsi://", f"iscsi://{conn['auth_username']}%{conn['auth_password']}@")
    assert subprocess.run(["iscsi-inq", good], capture_output=True, timeout=30).returncode == 0

    # The last attachment going removes the export; deleting removes the file.
    api("DELETE", f"/attachments/{att['id']}", want=200)
    api.wait_volume(vol["id"])
    assert conn["target_iqn"] not in targets(openstack)
    api.delete_volume(vol["id"])
    assert not os.path.exists(os.path.join(openstack["workdir"], "cinder", "volumes", f"volume-{vol['id']}"))


def test_template_volume_from_a_glance_image_is_multiattach_and_readonly(api, openstack, tmp_path):
    g = openstack["glance_endpoint"]
    assert g, "the harness starts Glance by default"
    status, image = procs.http(
        "POST", f"{g}/v2/images",
        {"name": "harness-image", "disk_format": "raw", "container_format": "bare", "visibility": "public"},
    )  # fmt: skip
    assert status == 201, image
    data = os.urandom(3 * MiB)
    req = urllib.request.Request(
        f"{g}/v2/images/{image['id']}/file", data=data, method="PUT",
        headers={"Content-Type": "application/octet-stream"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 204

    vol = api.create_volume(imageRef=image["id"], volume_type=openstack["template_volume_type"])
    assert vol["volume_image_metadata"]["image_id"] == image["id"]
    api(
        "POST", f"/volumes/{vol['id']}/metadata",
        {"metadata": {"vmthunder_template": "1", "vmthunder_image_id": image["id"]}}, want=200,
    )  # fmt: skip
    api("POST", f"/volumes/{vol['id']}/action", {"os-update_readonly_flag": {"readonly": True}}, want=202)

    # Two nodes' read-only attachments at once, as every compute node opening a template does.
    first = api.attach(vol["id"], mode="ro")
    node2 = dict(CONNECTOR, host="harness-test-2", initiator="iqn.2026-12.org.vmthunder:node2")
    second = api.attach(vol["id"], mode="ro", connector=node2)
    assert api.wait_volume(vol["id"], "in-use")["multiattach"] is True
    for att in (first, second):
        assert att["connection_info"]["access_mode"] == "ro"
        lun = Lun(att["connection_info"], tmp_path)
        assert lun.size() == 1 << 30  # the volume's size, not the image's
        assert lun.read(0, 3 * MiB, tmp_path) == data

    query = urllib.parse.quote(json.dumps({"vmthunder_template": "1"}))
    listed = api("GET", f"/volumes/detail?metadata={query}", want=200)
    assert [v["id"] for v in listed["volumes"]] == [vol["id"]]

    for att in (first, second):
        api("DELETE", f"/attachments/{att['id']}", want=200)
    api.wait_volume(vol["id"])
    api("POST", f"/volumes/{vol['id']}/action", {"os-update_readonly_flag": {"readonly": False}}, want=202)
    api.delete_volume(vol["id"])


def test_down_leaves_no_process_target_socket_or_file(tmp_path):
    """`up` and `down` as the Go tests run them: separate processes."""
    workdir = str(tmp_path / "cloud")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    up = subprocess.run(
        [sys.executable, "-m", "tests.openstack.cinder", "up", "--workdir", workdir, "--no-glance"],
        cwd=repo, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert up.returncode == 0, up.stderr[-3000:]
    info = json.loads(up.stdout.strip().splitlines()[-1])
    assert info["glance_endpoint"] is None
    state = json.load(open(os.path.join(workdir, cinder.STATE_FILE)))
    pids = list(state["groups"].values())
    assert all(procs.alive(p) for p in pids)

    # Leave an export behind (a live tgt target) for down to clean.
    a = Api(info)
    vol = a.create_volume()
    conn = a.attach(vol["id"])["connection_info"]
    assert conn["target_iqn"] in targets(info)
    amqp_port = int(info["transport_url"].rsplit(":", 1)[1].strip("/"))

    down = subprocess.run(
        [sys.executable, "-m", "tests.openstack.cinder", "down", "--workdir", workdir],
        cwd=repo, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert down.returncode == 0, down.stderr[-3000:]
    assert not os.path.exists(workdir)
    assert not any(procs.alive(p) for p in pids)
    assert procs.pids_mentioning(workdir) == []
    assert not os.path.exists(f"/run/tgtd/socket.{info['tgtd_control_port']}")
    assert not procs.port_open(amqp_port)
    assert not procs.port_open(int(info["iscsi_portal"].rsplit(":", 1)[1]))
    assert not procs.port_open(int(info["endpoint"].split(":")[2].split("/")[0]))
    assert not procs.port_open(state["epmd_port"])
    assert not os.path.exists(info["database_url"].split("unix_socket=")[1].split("&")[0])


def test_cloud_context_manager_cleans_up_after_a_failed_start(monkeypatch):
    """A start that fails part-way stops what it started and raises."""
    workdir = tempfile.mkdtemp(prefix="vmt-openstack-fail-")

    def broken_db_sync(self):
        raise RuntimeError("db sync broke")

    monkeypatch.setattr(cinder.Cinder, "db_sync", broken_db_sync)
    with pytest.raises(RuntimeError, match="db sync broke"):
        cinder.Cloud(workdir, glance=False).up()
    state = json.load(open(os.path.join(workdir, cinder.STATE_FILE)))
    assert state["groups"]  # RabbitMQ and tgtd had started
    assert not any(procs.alive(p) for p in state["groups"].values())
    assert procs.pids_mentioning(workdir + "/") == []
    cinder.down(workdir)
    assert not os.path.exists(workdir)


def test_snapshots_and_clones_carry_the_bytes(api, openstack, tmp_path):
    vol = api.create_volume()
    att = api.attach(vol["id"])
    data = os.urandom(MiB)
    src = tmp_path / "data"
    src.write_bytes(data)
    Lun(att["connection_info"], tmp_path).write(MiB, src)
    api("DELETE", f"/attachments/{att['id']}", want=200)
    api.wait_volume(vol["id"])

    snap = api("POST", "/snapshots", {"snapshot": {"volume_id": vol["id"]}}, want=202)["snapshot"]
    deadline = time.monotonic() + procs.START_TIMEOUT
    while api("GET", f"/snapshots/{snap['id']}", want=200)["snapshot"]["status"] != "available":
        assert time.monotonic() < deadline, "snapshot not available"
        time.sleep(0.3)
    from_snap = api.create_volume(snapshot_id=snap["id"], size=2)
    clone = api.create_volume(source_volid=vol["id"])
    for v, size in ((from_snap, 2), (clone, 1)):
        assert v["size"] == size
        a = api.attach(v["id"])
        lun = Lun(a["connection_info"], tmp_path)
        assert lun.size() == size << 30
        assert lun.read(MiB, MiB, tmp_path) == data
        api("DELETE", f"/attachments/{a['id']}", want=200)
        api.wait_volume(v["id"])
        api.delete_volume(v["id"])
    api("DELETE", f"/snapshots/{snap['id']}", want=202)
    deadline = time.monotonic() + procs.START_TIMEOUT
    while procs.http("GET", f"{openstack['endpoint']}/snapshots/{snap['id']}", None, api.headers)[0] != 404:
        assert time.monotonic() < deadline, "snapshot not deleted"
        time.sleep(0.3)
    api.delete_volume(vol["id"])
    left = os.listdir(os.path.join(openstack["workdir"], "cinder", "volumes"))
    assert not [n for n in left if vol["id"] in n or snap["id"] in n], left
