import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.openstack import cinder  # noqa: E402


@pytest.fixture(scope="session")
def openstack():
    """One control plane for the session: the info dict `up` prints."""
    with cinder.cloud() as info:
        yield info
