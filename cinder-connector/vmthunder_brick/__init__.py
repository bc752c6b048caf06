"""os-brick connector for the VMThunder sidecar."""

from vmthunder_brick.client import SidecarClient, SidecarError
from vmthunder_brick.connector import VMThunderConnector

__all__ = ["SidecarClient", "SidecarError", "VMThunderConnector"]
