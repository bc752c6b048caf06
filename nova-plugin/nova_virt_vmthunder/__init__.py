"""nova.virt.vmthunder: what `compute_driver = vmthunder.VMThunderDriver` loads.

Nova's load_compute_driver imports "nova.virt." + compute_driver, so this
package is installed into nova's own nova/virt directory; the code lives in
vmthunder_nova. Importing it registers the [vmthunder] options.
"""

from vmthunder_nova.driver import VMThunderDriver

__all__ = ["VMThunderDriver"]
