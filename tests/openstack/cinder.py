"""A real one-node Cinder (and Glance) for tests.

RabbitMQ, MariaDB and tgtd are private instances under the workdir.

    python -m tests.openstack.cinder up --workdir D [--no-glance]
        starts RabbitMQ, tgtd, glance-api, cinder-api, cinder-scheduler and
        cinder-volume under D and prints one JSON line (see Cloud.info);
    python -m tests.openstack.cinder down --workdir D [--keep]
        stops all of them and removes D (--keep leaves the logs).
(or `python tests/openstack/cinder.py ...` from anywhere.)

In Python: `with cloud() as info: ...` or the pytest fixture in conftest.py.
Run as root from the repository root with the venv's python.
"""

import argparse
import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid

if not __package__:  # run as a script path, not with -m from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.openstack import db, procs  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV_BIN = os.path.dirname(os.path.abspath(sys.executable))
VENV = os.path.dirname(VENV_BIN)
TEMPLATE_TYPE = "vmthunder-template"
API_VERSION = "3.54"
STATE_FILE = "harness.json"


def _venv_tool(name):
    path = os.path.join(VENV_BIN, name)
    if not os.path.exists(path):
        raise RuntimeError(f"{path} missing: run with the venv's python (make venv)")
    return path


class Rabbit:
    """A private RabbitMQ node (own name, ports, epmd, cookie, data) under
    workdir, so it clashes with neither a system instance nor another run.
    VMTHUNDER_TRANSPORT_URL names a running broker to use instead."""

    def __init__(self, workdir):
        self.dir = os.path.join(workdir, "rabbitmq")
        os.makedirs(self.dir, exist_ok=True)
        self.port = procs.free_port()
        self.dist_port = procs.free_port()
        self.epmd_port = procs.free_port()
        self.url = f"rabbit://guest:guest@127.0.0.1:{self.port}/"
        self.proc = None

    def env(self):
        d = self.dir
        env = dict(os.environ)
        env.update(
            HOME=d,  # the Erlang cookie lives here
            ERL_EPMD_PORT=str(self.epmd_port),
            RABBITMQ_NODENAME=f"vmt{self.port}@localhost",
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=f"{d}/mnesia",
            RABBITMQ_LOG_BASE=f"{d}/log",
            RABBITMQ_PID_FILE=f"{d}/rabbit.pid",
            RABBITMQ_ENABLED_PLUGINS_FILE=f"{d}/enabled_plugins",
            RABBITMQ_CONFIG_FILE=f"{d}/rabbitmq",
            RABBITMQ_ADVANCED_CONFIG_FILE=f"{d}/advanced.config",
            RABBITMQ_CONF_ENV_FILE=f"{d}/rabbitmq-env.conf",
        )
        return env

    def start(self):
        with open(f"{self.dir}/enabled_plugins", "w") as f:
            f.write("[].\n")
        for name in ("rabbitmq.conf", "rabbitmq-env.conf"):
            open(f"{self.dir}/{name}", "w").close()
        # The Debian wrapper (/usr/sbin/rabbitmq-server) su's to the system
        # user and its fixed directories; the real script takes our env.
        self.proc = procs.spawn(
            ["/usr/lib/rabbitmq/bin/rabbitmq-server"], f"{self.dir}/server.log", env=self.env(), cwd=self.dir
        )
        return self.proc.pid

    def wait(self):
        procs.wait_for(lambda: procs.port_open(self.port), "RabbitMQ", check=self._check)

    def _check(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"RabbitMQ exited {self.proc.returncode}: see {self.dir}/server.log")

    @staticmethod
    def stop_epmd(epmd_port):
        env = dict(os.environ, ERL_EPMD_PORT=str(epmd_port))
        subprocess.run(["epmd", "-kill"], env=env, capture_output=True, check=False)


class Tgtd:
    """A private tgtd (own control port, portal on loopback). Cinder's tgt
    helper calls plain `tgtadm`/`tgt-admin`, which talk to control port 0 and
    read /etc/tgt/targets.conf: wrappers early in the services' PATH point
    them at this tgtd and at a targets.conf including Cinder's volumes_dir."""

    def __init__(self, workdir):
        self.dir = os.path.join(workdir, "tgt")
        self.volumes_dir = os.path.join(self.dir, "volumes")
        self.bin_dir = os.path.join(self.dir, "bin")
        os.makedirs(self.volumes_dir, exist_ok=True)
        os.makedirs(self.bin_dir, exist_ok=True)
        self.portal_port = procs.free_port()
        self.control = self._free_control_port()
        self.proc = None

    @staticmethod
    def _free_control_port():
        # tgtd's control "port" is a unix socket /run/tgtd/socket.N.
        for _ in range(1000):
            port = 20000 + (uuid.uuid4().int % 12000)
            if not os.path.exists(f"/run/tgtd/socket.{port}"):
                return port
        raise RuntimeError("no free tgtd control port")

    def start(self):
        conf = os.path.join(self.dir, "targets.conf")
        with open(conf, "w") as f:
            f.write(f"include {self.volumes_dir}/*\ndefault-driver iscsi\n")
        wrappers = {
            "tgtadm": f'exec /usr/sbin/tgtadm -C {self.control} "$@"\n',
            "tgt-admin": f'exec /usr/sbin/tgt-admin -C {self.control} --conf {conf} "$@"\n',
        }
        for name, body in wrappers.items():
            path = os.path.join(self.bin_dir, name)
            with open(path, "w") as f:
                f.write("#!/bin/sh\n" + body)
            os.chmod(path, 0o755)
        self.proc = procs.spawn(
            ["tgtd", "-f", "-C", str(self.control), "--iscsi", f"portal=127.0.0.1:{self.portal_port}"],
            os.path.join(self.dir, "tgtd.log"),
            cwd=self.dir,  # so down finds it even without the state file
        )
        procs.wait_for(self._ready, "tgtd", check=self._check)
        return self.proc.pid

    def _ready(self):
        r = subprocess.run(
            ["tgtadm", "-C", str(self.control), "--mode", "sys", "--op", "show"], capture_output=True
        )
        return r.returncode == 0

    def _check(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"tgtd exited: see {self.dir}/tgtd.log")

    @staticmethod
    def remove_sockets(control):
        for suffix in ("", ".lock"):
            try:
                os.remove(f"/run/tgtd/socket.{control}{suffix}")
            except OSError:
                pass


class Cinder:
    def __init__(self, workdir, transport_url, tgt, db_url, glance_url=None):
        self.dir = os.path.join(workdir, "cinder")
        self.db_url = db_url
        self.conf = os.path.join(self.dir, "cinder.conf")
        self.transport_url = transport_url
        self.tgt = tgt
        self.glance_url = glance_url
        self.port = procs.free_port()
        self.project_id = uuid.uuid4().hex
        self.user_id = "vmthunder"
        self.endpoint = f"http://127.0.0.1:{self.port}/v3/{self.project_id}"
        self.procs = {}

    def headers(self):
        return {
            "X-Auth-Token": f"{self.user_id}:{self.project_id}",
            "OpenStack-API-Version": f"volume {API_VERSION}",
            "Accept": "application/json",
        }

    def write_config(self):
        d = self.dir
        for sub in ("state", "lock", "volumes", "log", "coordination"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        privsep = f"{_venv_tool('privsep-helper')} --config-file {self.conf}"
        glance = f"glance_api_servers = {self.glance_url}\n" if self.glance_url else ""
        with open(self.conf, "w") as f:
            f.write(f"""[DEFAULT]
debug = true
host = vmthunder-cinder
my_ip = 127.0.0.1
state_path = {d}/state
auth_strategy = noauth
transport_url = {self.transport_url}
osapi_volume_listen = 127.0.0.1
osapi_volume_listen_port = {self.port}
osapi_volume_workers = 1
api_paste_config = {VENV}/etc/cinder/api-paste.ini
resource_query_filters_file = {VENV}/etc/cinder/resource_filters.json
rootwrap_config = {VENV}/etc/cinder/rootwrap.conf
enabled_backends = file
# Tests make as many volumes as they like.
quota_volumes = -1
quota_snapshots = -1
quota_gigabytes = -1
quota_backups = -1
quota_backup_gigabytes = -1
quota_groups = -1
image_conversion_dir = {d}/state/conversion
{glance}
[database]
connection = {self.db_url}

[oslo_concurrency]
lock_path = {d}/lock

[coordination]
backend_url = file://{d}/coordination

[oslo_messaging_notifications]
driver = noop

[cinder_sys_admin]
helper_command = {privsep}

[privsep_osbrick]
helper_command = {privsep}

[file]
volume_driver = tests.openstack.filedriver.FileVolumeDriver
volume_backend_name = file
file_volumes_dir = {d}/volumes
target_helper = tgtadm
target_protocol = iscsi
target_ip_address = 127.0.0.1
target_port = {self.tgt.portal_port}
volumes_dir = {self.tgt.volumes_dir}
use_chap_auth = true
""")

    def env(self):
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([self.tgt.bin_dir, VENV_BIN, env.get("PATH", "/usr/sbin:/usr/bin")])
        env["PYTHONPATH"] = REPO  # tests.openstack.filedriver
        return env

    def db_sync(self):
        r = subprocess.run(
            [_venv_tool("cinder-manage"), "--config-file", self.conf, "db", "sync"],
            env=self.env(),
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            raise RuntimeError(f"cinder-manage db sync: {r.stderr[-2000:]}")

    def start(self):
        for svc in ("cinder-api", "cinder-scheduler", "cinder-volume"):
            log = os.path.join(self.dir, "log", f"{svc}.log")
            self.procs[svc] = procs.spawn(
                [_venv_tool(svc), "--config-file", self.conf, "--log-file", log],
                os.path.join(self.dir, "log", f"{svc}.out"),
                env=self.env(),
                cwd=self.dir,
            )
        return {svc: p.pid for svc, p in self.procs.items()}

    def _check(self):
        for svc, p in self.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{svc} exited {p.returncode}: see {self.dir}/log/{svc}.log")

    def api(self, method, path, body=None):
        return procs.http(method, self.endpoint + path, body, self.headers())

    def wait(self):
        procs.wait_for(lambda: procs.port_open(self.port), "cinder-api", check=self._check)

        def services_up():
            try:
                status, body = self.api("GET", "/os-services")
            except OSError:  # a slow answer while the services start
                return False
            if status != 200:
                return False
            up = {s["binary"] for s in body["services"] if s["state"] == "up" and s["status"] == "enabled"}
            return {"cinder-scheduler", "cinder-volume"} <= up

        procs.wait_for(
            services_up,
            "cinder-scheduler and cinder-volume up",
            timeout=procs.START_TIMEOUT,
            check=self._check,
        )

        # The scheduler places volumes only on pools it has heard of.
        def pool_known():
            try:
                status, body = self.api("GET", "/scheduler-stats/get_pools")
            except OSError:
                return False
            return status == 200 and bool(body.get("pools"))

        procs.wait_for(pool_known, "the file pool in the scheduler", check=self._check)

    def create_template_type(self):
        status, body = self.api(
            "POST",
            "/types",
            {"volume_type": {"name": TEMPLATE_TYPE, "extra_specs": {"multiattach": "<is> True"}}},
        )
        if status != 200:
            raise RuntimeError(f"creating volume type {TEMPLATE_TYPE}: {status} {body}")
        return body["volume_type"]["id"]


class Cloud:
    """Starts and stops the whole control plane under one workdir. The state
    file there lets `down` in another process stop what `up` started."""

    def __init__(self, workdir, glance=True):
        self.workdir = os.path.abspath(workdir)
        self.want_glance = glance
        self.info = None

    def up(self):
        if os.geteuid() != 0:
            raise RuntimeError("the control plane runs tgtd and privileged Cinder helpers: run as root")
        os.makedirs(self.workdir, exist_ok=True)
        os.chmod(self.workdir, 0o755)
        state = {"workdir": self.workdir, "groups": {}}
        self._save(state)
        try:
            self._up(state)
        except BaseException:
            self._save(state)
            down(self.workdir, keep=True)
            raise
        return self.info

    def _up(self, state):
        shared_url = os.environ.get("VMTHUNDER_TRANSPORT_URL")
        rabbit = None
        if shared_url:
            transport_url = shared_url
        else:
            rabbit = Rabbit(self.workdir)
            state["groups"]["rabbitmq"] = rabbit.start()
            state["epmd_port"] = rabbit.epmd_port
            transport_url = rabbit.url
            self._save(state)

        mariadb = db.MariaDB(self.workdir)
        state["groups"]["mariadb"] = mariadb.start()
        self._save(state)

        tgt = Tgtd(self.workdir)
        state["tgtd_control"] = tgt.control
        state["groups"]["tgtd"] = tgt.start()
        self._save(state)

        mariadb.wait()
        db_url = mariadb.create("cinder")
        g = None
        if self.want_glance:
            from tests.openstack import glance

            g = glance.Glance(self.workdir, VENV, mariadb.create("glance"))
        cinder = Cinder(self.workdir, transport_url, tgt, db_url, glance_url=g.url if g else None)
        cinder.write_config()

        def start_glance():
            state["groups"]["glance-api"] = g.start()  # recorded for down even if Cinder's sync fails

        # Both schemas at once; RabbitMQ boots meanwhile (several seconds).
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            glance_started = pool.submit(start_glance) if g else None
            cinder.db_sync()
            if glance_started:
                glance_started.result()
        self._save(state)
        if rabbit:
            rabbit.wait()
        if g:
            g.wait()
        for svc, pid in cinder.start().items():
            state["groups"][svc] = pid
        self._save(state)
        cinder.wait()
        type_id = cinder.create_template_type()

        self.info = {
            "workdir": self.workdir,
            "auth_strategy": "noauth",
            "endpoint": cinder.endpoint,
            "project_id": cinder.project_id,
            "user_id": cinder.user_id,
            "token": f"{cinder.user_id}:{cinder.project_id}",
            "api_version": API_VERSION,
            "template_volume_type": TEMPLATE_TYPE,
            "template_volume_type_id": type_id,
            "transport_url": transport_url,
            "iscsi_portal": f"127.0.0.1:{tgt.portal_port}",
            "tgtd_control_port": tgt.control,
            "cinder_conf": cinder.conf,
            "database_url": db_url,
            "glance_endpoint": g.url if g else None,
        }
        state["info"] = self.info
        self._save(state)

    def _save(self, state):
        tmp = os.path.join(self.workdir, STATE_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, os.path.join(self.workdir, STATE_FILE))

    def down(self, keep=False):
        down(self.workdir, keep=keep)

    def __enter__(self):
        return self.up()

    def __exit__(self, *exc):
        self.down(keep=bool(os.environ.get("VMTHUNDER_KEEP_OPENSTACK")))


def down(workdir, keep=False):
    """Stops everything `up` started under workdir: services first (so
    cinder-volume does not see its broker vanish mid-call), then the broker,
    tgtd (its targets are in memory only) and helpers still naming workdir."""
    workdir = os.path.abspath(workdir)
    try:
        with open(os.path.join(workdir, STATE_FILE)) as f:
            state = json.load(f)
    except FileNotFoundError:
        state = {"groups": {}}
    groups = state.get("groups", {})
    order = ["cinder-api", "cinder-volume", "cinder-scheduler", "glance-api", "mariadb", "rabbitmq", "tgtd"]
    for name in order + [n for n in groups if n not in order]:
        pid = groups.get(name)
        if pid:
            # tgtd ignores SIGTERM; its targets live in memory only.
            procs.stop_group(pid, sig=signal.SIGKILL if name == "tgtd" else signal.SIGTERM)
    procs.stop_pids(procs.pids_mentioning(workdir + "/"))
    if state.get("epmd_port"):
        Rabbit.stop_epmd(state["epmd_port"])
    if state.get("tgtd_control"):
        Tgtd.remove_sockets(state["tgtd_control"])
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)


def cloud(workdir=None, glance=True):
    """Context manager: `with cloud() as info:`; a temporary workdir unless given."""
    return Cloud(workdir or tempfile.mkdtemp(prefix="vmt-openstack-"), glance=glance)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tests.openstack.cinder", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up", help="start the control plane; prints one JSON line")
    u.add_argument("--workdir", required=True)
    u.add_argument("--no-glance", action="store_true", help="Cinder only (volume create --image unavailable)")
    d = sub.add_parser("down", help="stop it and remove the workdir")
    d.add_argument("--workdir", required=True)
    d.add_argument("--keep", action="store_true", help="leave the workdir (logs) behind")
    args = p.parse_args(argv)
    if args.cmd == "up":
        info = Cloud(args.workdir, glance=not args.no_glance).up()
        print(json.dumps(info), flush=True)
    else:
        down(args.workdir, keep=args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
