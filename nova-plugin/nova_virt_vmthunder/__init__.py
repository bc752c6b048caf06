"""Entry point for `compute_driver = vmthunder.VMThunderDriver`."""

from vmthunder_nova.driver import VMThunderDriver

__all__ = ["VMThunderDriver"]
