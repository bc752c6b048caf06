"""The control plane as a `fixtures.Fixture`, for testtools/stestr suites
(Nova's functional tests): `info = self.useFixture(ControlPlane()).info`."""

import tempfile

import fixtures

from tests.openstack import cinder


class ControlPlane(fixtures.Fixture):
    def __init__(self, glance=True, workdir=None):
        super().__init__()
        self.glance = glance
        self.workdir = workdir
        self.info = None

    def _setUp(self):
        workdir = self.workdir or tempfile.mkdtemp(prefix="vmt-openstack-")
        cloud = cinder.Cloud(workdir, glance=self.glance)
        self.info = cloud.up()
        self.addCleanup(cloud.down)
