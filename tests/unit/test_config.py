"""RuntimeSettings from the environment: the variables an operator sets for workers."""

from __future__ import annotations

import msgspec
import pytest

from sandbox.config import RuntimeSettings


def test_environment_sets_the_runtime():
    s = RuntimeSettings.from_env({"SBX_STATE_DIR": "/srv/sbx", "SBX_NETNS_POOL": "0",
                                  "SBX_EGRESS": "yes", "SBX_EGRESS_ALLOW": "10.0.0.0/8,"})
    assert (s.state_dir, s.netns_pool, s.egress, s.egress_allow) == (
        "/srv/sbx", 0, True, ("10.0.0.0/8",))
    assert RuntimeSettings.from_env({}).netns_pool == 4


@pytest.mark.parametrize("value", ["17", "-1"])
def test_netns_pool_is_bounded(value):
    with pytest.raises(msgspec.ValidationError, match="netns_pool"):
        RuntimeSettings.from_env({"SBX_NETNS_POOL": value})
