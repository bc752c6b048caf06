"""Glance 33 for the test control plane: file store, MariaDB, no auth.

Glance no longer has a standalone server (glance-api refuses to start); its
WSGI application runs under gunicorn, one process with a few threads.
"""

import os
import shutil
import subprocess

from tests.openstack import procs


class Glance:
    def __init__(self, workdir, venv, db_url):
        self.db_url = db_url
        self.dir = os.path.join(workdir, "glance")
        self.etc = os.path.join(self.dir, "etc")
        self.venv = venv
        self.port = procs.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def write_config(self):
        d = self.dir
        for sub in ("etc", "images", "staging", "tasks", "lock"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        shutil.copy(os.path.join(self.venv, "etc", "glance", "glance-api-paste.ini"), self.etc)
        with open(os.path.join(self.etc, "policy.yaml"), "w") as f:
            f.write(self.POLICY)
        with open(os.path.join(self.etc, "glance-api.conf"), "w") as f:
            f.write(f"""[DEFAULT]
debug = true
log_file = {d}/glance-api.log
enabled_backends = fs:file
worker_self_reference_url = {self.url}
image_cache_dir = {d}/cache

[database]
connection = {self.db_url}

[paste_deploy]
config_file = {self.etc}/glance-api-paste.ini

[glance_store]
default_backend = fs

[fs]
filesystem_store_datadir = {d}/images

[os_glance_staging_store]
filesystem_store_datadir = {d}/staging

[os_glance_tasks_store]
filesystem_store_datadir = {d}/tasks

[oslo_concurrency]
lock_path = {d}/lock

[oslo_policy]
policy_file = {self.etc}/policy.yaml
""")

    # Without Keystone every request is Glance's unauthenticated context (is_admin,
    # but no roles), which role-based policy defaults refuse: no auth means admin.
    POLICY = 'context_is_admin: ""\n'

    def env(self):
        return dict(os.environ, OS_GLANCE_CONFIG_DIR=self.etc)

    def start(self):
        self.write_config()
        conf = os.path.join(self.etc, "glance-api.conf")
        r = subprocess.run(
            [os.path.join(self.venv, "bin", "glance-manage"), "--config-file", conf, "db_sync"],
            capture_output=True,
            text=True,
            env=self.env(),
        )
        if r.returncode != 0:
            raise RuntimeError(f"glance-manage db_sync: {r.stderr[-2000:]}")
        self.proc = procs.spawn(
            [
                os.path.join(self.venv, "bin", "gunicorn"),
                "--bind",
                f"127.0.0.1:{self.port}",
                "--workers",
                "1",
                "--threads",
                "4",
                "--timeout",
                "300",
                "glance.wsgi.api:application",
            ],
            os.path.join(self.dir, "gunicorn.log"),
            env=self.env(),
            cwd=self.dir,
        )
        return self.proc.pid

    def _check(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"glance (gunicorn) exited {self.proc.returncode}: see {self.dir}/*.log")

    def wait(self):
        def versions():
            status, _ = procs.http("GET", self.url + "/versions", timeout=5)
            return status == 200

        procs.wait_for(
            lambda: procs.port_open(self.port) and versions(),
            "glance-api",
            timeout=procs.START_TIMEOUT,
            check=self._check,
        )
