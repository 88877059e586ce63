"""What makes a pooled network namespace reusable: /proc/net/sockstat and /proc/net/dev."""

from __future__ import annotations

import pytest

from sandbox.netns_pool import loopback_counters, sockets_left

CLEAN = """sockets: used 0
TCP: inuse 0 orphan 0 tw 0 alloc 12 mem 3
UDP: inuse 0 mem 7
UDPLITE: inuse 0
RAW: inuse 0
FRAG: inuse 0 memory 0
"""
DEV = """Inter-|   Receive                   |  Transmit
 face |bytes    packets errs drop ...|bytes    packets errs drop ...
  eth0: 900 9 0 0 0 0 0 0 900 9 0 0 0 0 0 0
    lo: 328 6 0 0 0 0 0 0 328 6 0 0 0 0 0 0
"""


def test_host_wide_figures_do_not_count():
    # alloc and mem are the host's totals, not this namespace's.
    assert sockets_left(CLEAN) == 0


@pytest.mark.parametrize("line,count", [
    ("sockets: used 2", 2),
    ("TCP: inuse 0 orphan 0 tw 1 alloc 12 mem 3", 1),
    ("TCP: inuse 0 orphan 3 tw 0 alloc 12 mem 3", 3),
    ("UDP: inuse 1 mem 7", 1),
    ("RAW: inuse 1", 1),
    ("FRAG: inuse 2 memory 4096", 2),
])
def test_any_socket_left_counts(line, count):
    text = CLEAN.replace(line.split(":")[0] + ":", "IGNORED:", 1) + line + "\n"
    assert sockets_left(text) == count


def test_loopback_row_is_read_whole():
    assert loopback_counters(DEV) == (328, 6, 0, 0, 0, 0, 0, 0, 328, 6, 0, 0, 0, 0, 0, 0)


def test_no_loopback_is_an_error():
    with pytest.raises(ValueError):
        loopback_counters(DEV.replace("    lo:", "   lo0:"))
