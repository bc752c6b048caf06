"""nova.virt.vmthunder: what `compute_driver = vmthunder.VMThunderDriver` loads.

Imported under that name by nova_virt_vmthunder's finder; the code lives in
vmthunder_nova. Importing it registers the [vmthunder] options.
"""

from vmthunder_nova.driver import VMThunderDriver

__all__ = ["VMThunderDriver"]
