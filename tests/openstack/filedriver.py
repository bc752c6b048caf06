"""A Cinder volume backend for tests: LVM's driver with volumes kept as files.

This kernel has no device-mapper, so LVM itself cannot run; everything else
about the LVM driver stays (its target-driver plumbing, connection handling,
image copy through local_path). Exports are Cinder's own tgt target helper
serving the file as a real iSCSI LUN, with CHAP when use_chap_auth is set.
"""

import os
import shutil
import subprocess

from cinder import exception
from cinder.volume import configuration
from cinder.volume.drivers import lvm
from oslo_config import cfg
from oslo_log import log as logging

LOG = logging.getLogger(__name__)

file_opts = [
    cfg.StrOpt("file_volumes_dir", help="Directory holding one sparse file per volume and snapshot."),
    cfg.IntOpt("file_capacity_gb", default=1000, help="Capacity reported to the scheduler."),
]
cfg.CONF.register_opts(file_opts, group=configuration.SHARED_CONF_GROUP)

GiB = 1 << 30


class FileVolumeDriver(lvm.LVMVolumeDriver):
    VERSION = "1.0.0"
    CI_WIKI_NAME = "VMThunder_tests"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.configuration.append_config_values(file_opts)
        self.backend_name = self.configuration.safe_get("volume_backend_name") or "file"

    @property
    def _dir(self):
        d = self.configuration.file_volumes_dir
        if not d:
            raise exception.InvalidConfigurationValue(option="file_volumes_dir", value=d)
        return d

    def do_setup(self, context):
        os.makedirs(self._dir, mode=0o700, exist_ok=True)

    def check_for_setup_error(self):
        if not os.path.isdir(self._dir):
            raise exception.VolumeBackendAPIException(data=f"{self._dir} is not a directory")

    def local_path(self, volume, vg=None):
        return os.path.join(self._dir, volume["name"])

    def _snapshot_path(self, snapshot):
        return os.path.join(self._dir, snapshot["name"])

    def _update_volume_stats(self):
        st = os.statvfs(self._dir)
        free_gb = min(st.f_bavail * st.f_frsize // GiB, self.configuration.file_capacity_gb)
        used = [n for n in os.listdir(self._dir) if n.startswith("volume-")]
        self._stats = {
            "volume_backend_name": self.backend_name,
            "vendor_name": "VMThunder tests",
            "driver_version": self.VERSION,
            "storage_protocol": self.protocol,
            "pools": [
                {
                    "pool_name": self.backend_name,
                    "total_capacity_gb": self.configuration.file_capacity_gb,
                    "free_capacity_gb": free_gb,
                    "reserved_percentage": 0,
                    "QoS_support": False,
                    "thin_provisioning_support": True,
                    "thick_provisioning_support": False,
                    "max_over_subscription_ratio": 20.0,
                    "total_volumes": len(used),
                    "multiattach": True,
                    "backend_state": "up",
                }
            ],
            "shared_targets": False,
            "sparse_copy_volume": True,
        }

    def _create_file(self, path, size_gb):
        # Sparse: a 1 GiB volume costs nothing until written.
        with open(path, "xb") as f:
            f.truncate(size_gb * GiB)
        os.chmod(path, 0o600)

    def create_volume(self, volume):
        self._create_file(self.local_path(volume), volume["size"])

    def delete_volume(self, volume):
        try:
            os.remove(self.local_path(volume))
        except FileNotFoundError:
            LOG.info("volume file of %s already gone", volume["id"])

    def copy_image_to_volume(self, context, volume, image_service, image_id, disable_sparse=False):
        super().copy_image_to_volume(context, volume, image_service, image_id, disable_sparse)
        # Writing an image into a regular file (unlike LVM's block device)
        # leaves it the image's size: grow it back to the volume's.
        self._grow(self.local_path(volume), volume["size"])

    def _grow(self, path, size_gb):
        with open(path, "r+b") as f:
            if os.fstat(f.fileno()).st_size < size_gb * GiB:
                f.truncate(size_gb * GiB)

    def extend_volume(self, volume, new_size):
        with open(self.local_path(volume), "r+b") as f:
            f.truncate(new_size * GiB)

    def _copy(self, src, dst, size_gb):
        # cp --sparse keeps holes, so clones of mostly empty volumes stay cheap.
        subprocess.run(["cp", "--sparse=always", src, dst], check=True)
        self._grow(dst, size_gb)

    def create_cloned_volume(self, volume, src_vref):
        self._copy(self.local_path(src_vref), self.local_path(volume), volume["size"])

    def create_snapshot(self, snapshot):
        self._copy(self.local_path(snapshot.volume), self._snapshot_path(snapshot), snapshot.volume_size)

    def delete_snapshot(self, snapshot):
        try:
            os.remove(self._snapshot_path(snapshot))
        except FileNotFoundError:
            pass

    def create_volume_from_snapshot(self, volume, snapshot):
        self._copy(self._snapshot_path(snapshot), self.local_path(volume), volume["size"])

    def revert_to_snapshot(self, context, volume, snapshot):
        shutil.copyfile(self._snapshot_path(snapshot), self.local_path(volume))

    def migrate_volume(self, ctxt, volume, host, thin=False, mirror_count=0):
        return False, None

    def retype(self, context, volume, new_type, diff, host):
        return True, None

    def ensure_export(self, context, volume):
        return self.target_driver.ensure_export(context, volume, self.local_path(volume))

    def create_export(self, context, volume, connector, vg=None):
        info = self.target_driver.create_export(context, volume, self.local_path(volume))
        return {"provider_location": info["location"], "provider_auth": info["auth"]}
