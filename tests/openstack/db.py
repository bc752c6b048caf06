"""A private MariaDB server for the test Cinder (Debian's mariadb-server).

Cinder's three services share one database. On sqlite they fail at once
with "database is locked" whenever two write at the same time (oslo.db opens
deferred transactions, which sqlite cannot upgrade while another process
writes): 16 of 24 parallel create/attach/detach/delete rounds failed so.
MariaDB through PyMySQL (pure Python, so eventlet-friendly) is what Cinder
runs on in devstack.
"""

import os
import subprocess

from tests.openstack import procs


class MariaDB:
    def __init__(self, workdir):
        self.dir = os.path.join(workdir, "mariadb")
        self.data = os.path.join(self.dir, "data")
        self.socket = os.path.join(self.dir, "mysqld.sock")
        if len(self.socket.encode()) > 107:  # sun_path
            raise RuntimeError(f"workdir {workdir} is too long for MariaDB's unix socket: use a shorter one")
        self.port = procs.free_port()
        self.proc = None

    def _common(self):
        # --no-defaults: nothing from /etc/mysql; a small InnoDB for tests.
        return ["--no-defaults", "--user=root", f"--datadir={self.data}", "--innodb-log-file-size=8M"]

    # A test database need not survive a crash: no flushes, so Cinder's
    # schema migrations take seconds, not minutes.
    FAST = [
        "--innodb-flush-log-at-trx-commit=0",
        "--innodb-doublewrite=0",
        "--innodb-flush-method=nosync",
        "--skip-innodb-file-per-table",
        "--sync-frm=0",
    ]

    def start(self):
        os.makedirs(self.dir, exist_ok=True)
        r = subprocess.run(
            [
                "mariadb-install-db",
                *self._common(),
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ],
            capture_output=True, text=True,
        )  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(f"mariadb-install-db: {r.stdout[-1000:]}{r.stderr[-1000:]}")
        self.proc = procs.spawn(
            [
                "/usr/sbin/mariadbd",
                *self._common(),
                *self.FAST,
                f"--socket={self.socket}",
                f"--port={self.port}",
                "--bind-address=127.0.0.1",
                f"--pid-file={self.dir}/mariadbd.pid",
                f"--log-error={self.dir}/error.log",
                "--skip-log-bin",
                "--skip-name-resolve",  # no DNS lookups of clients (may hang here)
                "--innodb-buffer-pool-size=64M",
                "--max-connections=500",
            ],
            os.path.join(self.dir, "mariadbd.out"),
            cwd=self.dir,
        )
        return self.proc.pid

    def _check(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"mariadbd exited {self.proc.returncode}: see {self.dir}/error.log")

    def sql(self, statement):
        return subprocess.run(
            ["mariadb", "--no-defaults", f"--socket={self.socket}", "-uroot", "-e", statement],
            capture_output=True,
            text=True,
        )

    def wait(self):
        procs.wait_for(
            lambda: self.sql("SELECT 1").returncode == 0,
            "MariaDB",
            timeout=procs.START_TIMEOUT,
            check=self._check,
        )

    def create(self, name):
        r = self.sql(f"CREATE DATABASE {name} CHARACTER SET utf8mb4")
        if r.returncode != 0:
            raise RuntimeError(f"creating database {name}: {r.stderr}")
        # Over the unix socket: root@localhost is the only account, and
        # with --skip-name-resolve a TCP client is 127.0.0.1, not localhost.
        return f"mysql+pymysql://root@/{name}?unix_socket={self.socket}&charset=utf8mb4"
