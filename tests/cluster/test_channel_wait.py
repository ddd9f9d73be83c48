"""Channel polling (cluster/channel_wait.py) and the expert counts' fixed wire form (cluster/messages.py);
compiled graphs run with polling in tests/cluster/test_cluster_executor.py."""

import numpy as np
import pytest
from ray.exceptions import RayChannelTimeoutError
from ray.experimental.channel import shared_memory_channel

from cluster.channel_wait import set_channel_poll
from cluster.messages import count_pairs, counts_by_layer


@pytest.fixture
def spin_read():
    original = shared_memory_channel.Channel.read
    yield original
    shared_memory_channel.Channel.read = original


def test_poll_installs_and_restores(spin_read):
    set_channel_poll(100)
    assert shared_memory_channel.Channel.read is not spin_read
    set_channel_poll(50)  # again: still wraps Ray's own read, not the wrapper
    assert shared_memory_channel.Channel.read.spin_read is spin_read
    set_channel_poll(0)
    assert shared_memory_channel.Channel.read is spin_read


def test_poll_retries_until_the_value_is_there(spin_read):
    tries = []

    def fake(self, timeout=None):
        tries.append(timeout)
        if len(tries) < 4:
            raise RayChannelTimeoutError("not yet")
        return "value"

    shared_memory_channel.Channel.read = fake
    set_channel_poll(50)
    assert shared_memory_channel.Channel.read(None, 1.0) == "value"
    assert tries == [0, 0, 0, 0]  # every try returns at once; the waiting is ours
    tries.clear()
    with pytest.raises(RayChannelTimeoutError):
        shared_memory_channel.Channel.read(None, 0.0)


def test_counts_fill_their_row_and_leave_the_input_alone():
    first = count_pairs(None, 3, 1, np.array([1, 2, 0, 4]))
    assert first.shape == (3, 4) and first.dtype == np.int32
    view = first.copy()
    view.flags.writeable = False  # a channel buffer's view
    second = count_pairs(view, 3, 2, np.array([0, 0, 7, 0]))
    assert (view == first).all()
    by_layer = counts_by_layer(second, (3, 7, 11))
    expected = {3: [0, 0, 0, 0], 7: [1, 2, 0, 4], 11: [0, 0, 7, 0]}
    assert {k: v.tolist() for k, v in by_layer.items()} == expected
    assert counts_by_layer(None, (3,)) == {}


def test_auto_choice_spins_only_where_every_process_has_a_core():
    from cluster.channel_wait import OVERSUBSCRIBED_POLL_US, auto_channel_poll_us

    assert auto_channel_poll_us(cores=16, processes=5) == 0.0
    assert auto_channel_poll_us(cores=5, processes=5) == 0.0
    assert auto_channel_poll_us(cores=2, processes=5) == OVERSUBSCRIBED_POLL_US
