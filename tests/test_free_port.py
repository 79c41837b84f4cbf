"""pretrain/train/distributed.py `free_port`: a bindable port below the kernel's ephemeral
range (where an outgoing connection could take it before the rendezvous binds it), picked at
random whatever the seed of Python's own RNG.

Run: `.venv/bin/python -m pytest -q tests/test_free_port.py`.
"""
from __future__ import annotations

import random
import socket

from pretrain.train.distributed import _ephemeral_low, free_port


def test_ports_are_free_below_the_ephemeral_range_and_not_seeded():
    low = _ephemeral_low()
    ports = []
    for _ in range(20):
        random.seed(0)  # the trainer and tests seed the module RNG: the pick must not follow it
        ports.append(free_port())
    assert all(1024 <= p < low for p in ports), (low, ports)
    assert len(set(ports)) > 10, ports
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", ports[-1]))  # free when returned


def test_a_taken_port_is_never_returned(monkeypatch):
    import pretrain.train.distributed as d

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", free_port()))
        held.listen()
        taken = held.getsockname()[1]
        free = free_port()
        picks = iter([taken, taken, free])

        class Scripted:  # the random picks, in order: the held port twice, then a free one
            def randrange(self, a, b):
                return next(picks)

        monkeypatch.setattr(d.random, "SystemRandom", Scripted)
        assert d.free_port() == free
