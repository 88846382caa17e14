"""The small helpers both servers share (loraplane/grpc_server.py)."""

from __future__ import annotations

import gc

import pytest

from loraplane.grpc_server import check_address, freeze_startup_heap


@pytest.mark.parametrize("good", ["127.0.0.1:0", "0.0.0.0:50051", "[::]:8086", "localhost:65535"])
def test_addresses_that_listen(good):
    check_address("listen", good)


@pytest.mark.parametrize("bad", ["", "8086", ":8086", "host:", "host:http", "host:65536", "host:-1"])
def test_addresses_that_cannot(bad):
    with pytest.raises(ValueError, match="listen must be HOST:PORT"):
        check_address("listen", bad)


def test_freezing_the_start_up_heap_takes_it_out_of_full_collections():
    try:
        frozen = freeze_startup_heap()
        assert frozen == gc.get_freeze_count() > 1000  # at least pytest's and the project's modules
        kept = [object() for _ in range(10)]
        # What is allocated after the freeze stays collectable: a new cycle is freed by a full pass.
        cycle = [kept]
        cycle.append(cycle)
        del cycle
        assert gc.collect(2) >= 1
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
