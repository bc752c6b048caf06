"""Makes `compute_driver = vmthunder.VMThunderDriver` load wherever nova is.

Nova's load_compute_driver imports "nova.virt." + compute_driver and has no
other way in. A package installed into nova/virt works only when nova is a
regular install in the same site-packages: with nova installed editable (as
devstack's setup_develop does) the files land in a `nova` directory nova no
longer lives in, which is either ignored (a path-file editable install) or
taken for a namespace package that hides nova (a finder editable install).
So nothing is put into nova's tree: nova_virt_vmthunder.pth calls install()
at interpreter start, and this finder answers the one name
nova.virt.vmthunder with nova_virt_vmthunder/compute_driver.py, after
nova.virt itself was imported the usual way.
"""

import importlib.abc
import importlib.util
import os
import sys

MODULE = "nova.virt.vmthunder"
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compute_driver.py")


class NovaVirtFinder(importlib.abc.MetaPathFinder):
    """Finds nova.virt.vmthunder, and nothing else."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != MODULE:
            return None
        return importlib.util.spec_from_file_location(fullname, _SOURCE)


def install():
    """Put the finder first on sys.meta_path (once), ahead of a stale
    nova/virt/vmthunder an older release of this package left in nova."""
    if not any(isinstance(f, NovaVirtFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, NovaVirtFinder())
