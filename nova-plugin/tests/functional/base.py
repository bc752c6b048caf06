"""The Nova functional harness around the VMThunder driver, shared by the
functional tests and `make demo --openstack`.

Nova runs as its functional tests run it (nova.tests.functional: the
in-process API, conductor, scheduler and placement, GlanceFixture for
images), with compute_driver = the VMThunder driver on the REAL system
libvirtd (TCG guests, no network) and the REAL sidecar daemon, whose
templates are published into a REAL Cinder (tests/openstack: cinder-api,
-scheduler and -volume over RabbitMQ, volumes on tgtd).

VMTHUNDER_BIN names a built sidecar; otherwise one is built to a private
path. VMTHUNDER_KEEP=1 keeps the work directory (logs: sidecar/daemon.log,
nova.log, openstack/).
"""

import nova.tests.functional  # noqa: F401, I001  (eventlet's monkey patching first, as in Nova's own)

import io
import os
import shutil
import sys
import tempfile
import warnings
import logging

import fixtures
from sqlalchemy import exc as sqla_exc
import libvirt  # (imported before nova's import poison is installed)

import harness  # noqa: I001  (sets sys.path for the shims and tests.openstack)

from nova import context as nova_context
from nova import test
from nova.tests import fixtures as nova_fixtures
from nova.tests.functional import fixtures as func_fixtures
from nova.tests.functional import integrated_helpers

from tests.openstack import cinder as openstack_cinder
from vmthunder_nova import driver as vmthunder_driver  # noqa: F401  (registers [vmthunder])

DRIVER = "vmthunder.VMThunderDriver"  # nova.virt.vmthunder, installed with the plugin
BOOT_TIMEOUT = 300  # four TCG guests at once on two CPUs take ~75 s


def _no_fixture(*args, **kwargs):
    return fixtures.Fixture()


class NovaOnVMThunder(test.TestCase, integrated_helpers.InstanceHelperMixin):
    """Nova's services on one compute node over the real libvirtd, sidecar
    and Cinder (set up once per class: the Cinder and the guest image are
    slow to make)."""

    REQUIRES_LOCKING = True

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.work = tempfile.mkdtemp(prefix="vmt-nova-func-")
        cls.cloud_cm = cls.sidecar = None
        try:
            os.chmod(cls.work, 0o755)
            cls.instances_path = os.path.join(cls.work, "instances")
            os.makedirs(cls.instances_path, mode=0o755)
            cls.guest = harness.build_guest(os.path.join(cls.work, "guest"))
            cls.cloud = cls._cloud_up()
            os.makedirs(os.path.join(cls.work, "sidecar"), mode=0o755)
            cls.sidecar = harness.Sidecar(os.path.join(cls.work, "sidecar"), cls.instances_path, cls.cloud)
            cls.sidecar.start()
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def _cloud_up(cls):
        """tests/openstack's Cinder; a second try when the first start
        times out (a loaded machine: cinder-api answers late)."""
        for attempt in (1, 2):
            cls.cloud_cm = openstack_cinder.cloud(os.path.join(cls.work, f"openstack{attempt}"), glance=False)
            try:
                return cls.cloud_cm.__enter__()
            except TimeoutError as e:
                cls.cloud_cm.__exit__(None, None, None)
                cls.cloud_cm = None
                if attempt == 2:
                    raise
                print(f"the test Cinder did not come up ({e}); trying once more", file=sys.stderr)

    @classmethod
    def tearDownClass(cls):
        try:
            if cls.sidecar is not None:
                cls.sidecar.stop()
        finally:
            if cls.cloud_cm is not None:
                cls.cloud_cm.__exit__(None, None, None)
            if os.environ.get("VMTHUNDER_KEEP"):
                print(f"kept {cls.work}")
            else:
                shutil.rmtree(cls.work, ignore_errors=True)
        super().tearDownClass()

    def setUp(self):
        # nova.test.TestCase poisons what a functional test with a fake
        # driver must not touch: libvirt imports, /sys, os.uname, privsep's
        # helper, libvirt's event thread. This driver is the real one on
        # the real libvirtd, so those stay real: privsep runs in process
        # (we are root), and libvirt's event loop is not started (nothing
        # here waits on its events: boots are polled, nothing is detached).
        self.useFixture(fixtures.MockPatch("nova.virt.libvirt.host.Host._init_events"))
        poisons = (
            "GenericPoisonFixture",
            "SysFsPoisonFixture",
            "ImportModulePoisonFixture",
            "PrivsepNoHelperFixture",
        )
        patches = [fixtures.MockPatchObject(nova_fixtures, name, _no_fixture) for name in poisons]
        for p in patches:
            p.setUp()
        try:
            super().setUp()
        finally:
            for p in patches:
                p.cleanUp()
        self.useFixture(nova_fixtures.PrivsepFixture())
        # Nova's WarningsFixture makes SQLAlchemy's deprecation warnings
        # errors; Nova 34's DB API still uses noload(), deprecated in the
        # SQLAlchemy 2.1 of this venv (a version skew, not our code).
        warnings.filterwarnings("ignore", category=sqla_exc.SADeprecationWarning)
        # The system libvirtd may run other tests' domains, which this new
        # compute service would take for a reused database's instances.
        self.useFixture(fixtures.MockPatch("nova.compute.manager.ComputeManager._sanity_check_new_host"))

        self.flags(
            compute_driver=DRIVER,
            instances_path=self.instances_path,
            allow_resize_to_same_host=True,
            # Multi-create and the resize below on one small host.
            cpu_allocation_ratio=16.0,
            ram_allocation_ratio=4.0,
            disk_allocation_ratio=16.0,
        )
        # The wheel installs Nova's paste config under sys.prefix, not
        # beside the package as in a source tree.
        self.flags(api_paste_config=os.path.join(sys.prefix, "etc", "nova", "api-paste.ini"), group="wsgi")
        self.flags(virt_type="qemu", group="libvirt")
        # Domain names of this run only: the system libvirtd is shared, and
        # Nova's default names (instance-%08x) restart with each database.
        self.domain_prefix = f"vmtf-{os.path.basename(self.work)[-8:]}-"
        self.flags(instance_name_template=self.domain_prefix + "%08x")
        self.flags(api_socket=self.sidecar.api_socket, group="vmthunder")
        self.flags(resume_interval=0, group="vmthunder")

        # Registered first, so it runs last: after the compute service
        # stopped, whatever domains this test's servers left behind go.
        self.addCleanup(self._remove_domains)

        # Nova's log as it happens (the test's own copy comes at its end).
        handler = logging.FileHandler(os.path.join(self.work, "nova.log"))
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(name)s] %(message)s"))
        handler.setLevel(logging.INFO)
        logging.getLogger().addHandler(handler)
        self.addCleanup(logging.getLogger().removeHandler, handler)

        self.placement = self.useFixture(func_fixtures.PlacementFixture()).api
        self.useFixture(nova_fixtures.NeutronFixture(self))
        self.glance = self.useFixture(nova_fixtures.GlanceFixture(self))
        self.useFixture(nova_fixtures.RealPolicyFixture())
        self.start_service("conductor")
        self.start_service("scheduler")
        self.compute = self.start_service("compute", host="compute1")
        api = self.useFixture(nova_fixtures.OSAPIFixture(api_version="v2.1"))
        self.api = api.admin_api
        self.api.microversion = "2.74"

    # -- helpers ---------------------------------------------------------

    def _image(self, name, nonce, data=None):
        """A Glance image of the test guest booted by direct kernel boot,
        its kernel and ramdisk images with their real bytes (Nova
        downloads those into the instance directory, as for any AKI/ARI
        image). The root image's bytes are there only with data (a path),
        for a stock boot: a template root disk never comes from Glance."""
        ctx = nova_context.get_admin_context()
        ids = {}
        for kind, fmt in (("kernel", "aki"), ("initrd", "ari")):
            with open(self.guest[kind], "rb") as f:
                blob = f.read()
            meta = {
                "name": f"{name}-{kind}",
                "disk_format": fmt,
                "container_format": fmt,
                "size": len(blob),
                "visibility": "public",
                "properties": {},
            }
            ids[kind] = self.glance.create(ctx, meta, data=io.BytesIO(blob))["id"]
        image = self.glance.create(
            ctx,
            {
                "name": name,
                "disk_format": "raw",
                "container_format": "bare",
                "size": self.guest["size"],
                "visibility": "public",
                "min_disk": 0,
                "properties": {
                    "kernel_id": ids["kernel"],
                    "ramdisk_id": ids["initrd"],
                    "os_command_line": self.guest["cmdline"].replace("NONCE", nonce),
                    "hw_disk_bus": "virtio",
                    "architecture": "x86_64",
                },
            },
            data=open(data, "rb") if data else None,  # noqa: SIM115  (the fixture reads it whole)
        )
        return image["id"]

    def _flavor(self, name, ram):
        flavor = self.api.post_flavor({"flavor": {"name": name, "ram": ram, "vcpus": 1, "disk": 1}})
        return flavor["id"]

    def _wait_server(self, server_id, status, timeout=BOOT_TIMEOUT, passing=("BUILD",)):
        def settled():
            """Right after an action's API call its task state is set;
            the server has settled when it is clear again."""
            s = self.api.get_server(server_id)
            if s["status"] == "ERROR" and status != "ERROR":
                self.fail(f"server {server_id} went to ERROR: {s.get('fault')}")
            if s.get("OS-EXT-STS:task_state") is not None:
                return None  # the action (set when the API accepted it) runs
            if s["status"] == status:
                return s
            if s["status"] in passing:
                return None  # e.g. between the conductor and the compute service
            # The action ended elsewhere (e.g. a stop reverted on failure).
            self.fail(f"server {server_id} settled in {s['status']}, not {status}: {s.get('fault')}")

        return harness.wait_for(settled, f"server {server_id} {status}", timeout=timeout)

    def _wait_booted(self, server_id, nonce, timeout=BOOT_TIMEOUT):
        """The guest's own boot marker on its serial console (console.log
        in the instance directory, restarted by each start of the domain)."""
        want = f"{self.guest['marker']} nonce={nonce}"
        harness.wait_for(
            lambda: want in harness.console_log(self.instances_path, server_id),
            f"'{want}' on the console of {server_id}",
            timeout=timeout,
        )

    def _exports(self):
        return {e["id"]: e for e in self.sidecar.client.list_exports()}

    def _store(self, server_id):
        return os.path.join(self.instances_path, server_id, "disk.vmthunder")

    def _guest_write(self, server_id):
        """The block the guest writes at write_offset, read from its cow store."""
        with open(self._store(server_id), "rb") as f:
            f.seek(self.guest["write_offset"])
            return f.read(64).split(b"\n")[0].decode(errors="replace")

    def _remove_domains(self):
        """Domains of this run's instances (the shared libvirtd keeps them
        when a test fails before deleting its servers)."""
        prefix = getattr(self, "domain_prefix", None)
        if prefix is None:
            return  # set up failed before Nova could make any
        conn = libvirt.open("qemu:///system")
        try:
            for dom in conn.listAllDomains():
                try:
                    if not dom.name().startswith(prefix):
                        continue
                    if dom.isActive():
                        dom.destroy()
                    dom.undefine()
                    print(f"removed domain {dom.name()} left by the test", file=sys.stderr)
                except libvirt.libvirtError as e:
                    print(f"removing a domain left by the test: {e}", file=sys.stderr)
        finally:
            conn.close()

    def _node_stats(self):
        """The sidecar's node-wide counters (origin_bytes: all its origin reads)."""
        return self.sidecar.client._call("GET", "/stats")

    def _base(self, base_id):
        return {b["id"]: b for b in self.sidecar.client._call("GET", "/bases")["bases"]}.get(base_id)
