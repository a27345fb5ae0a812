"""The ``flex`` dispatcher (DeepEP): refused by name where the ``deep_ep`` package is missing. Its
numerics are checked against the all-to-all dispatcher by the GPU validation script (DeepEP needs GPUs)."""

from importlib.util import find_spec

import pytest

from moe_dispatch import FlexDispatcher, MoEError, MoELayer

pytestmark = pytest.mark.skipif(find_spec("deep_ep") is not None, reason="deep_ep is installed here")


def test_flex_is_refused_without_deep_ep():
    message = r"^dispatcher='flex' needs the deep_ep package \(DeepEP\), which is not installed$"
    with pytest.raises(MoEError, match=message):
        FlexDispatcher(4, ep_group=None)
    with pytest.raises(MoEError, match=message):
        MoELayer(4, 6, 4, 2, ep_group=None, dispatcher="flex")
