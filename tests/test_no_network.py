"""The suite's network guard (tests/conftest.py): loopback and unix sockets work, anything else is refused.

192.0.2.1 is TEST-NET-1, reserved for documentation: nothing answers there, and the guard
refuses it before a packet is sent.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from tests.conftest import NetworkRefused, is_loopback

pytest_plugins = ["pytester"]

OUTSIDE = ("192.0.2.1", 443)


@pytest.fixture
def refused(network_guard):
    """What the guard refused during the test, taken away so that the test itself may pass."""
    yield network_guard.refused
    network_guard.refused.clear()


CASES = [
    (socket.AF_INET, ("127.0.0.1", 80), True),
    (socket.AF_INET, ("127.8.9.10", 80), True),
    (socket.AF_INET, ("localhost", 80), True),
    (socket.AF_INET6, ("::1", 80, 0, 0), True),
    (socket.AF_INET6, ("::ffff:127.0.0.1", 80, 0, 0), True),
    (socket.AF_UNIX, "/tmp/some.sock", True),
    (socket.AF_INET, ("192.0.2.1", 80), False),
    (socket.AF_INET, ("0.0.0.0", 80), False),
    (socket.AF_INET, ("10.0.0.1", 80), False),
    (socket.AF_INET, ("api.openai.com", 443), False),
    (socket.AF_INET6, ("2001:db8::1", 80, 0, 0), False),
    (socket.AF_INET6, ("::ffff:192.0.2.1", 80, 0, 0), False),
]


@pytest.mark.parametrize(
    ("family", "address", "allowed"), CASES, ids=[str(a[0] if isinstance(a, tuple) else a) for _, a, _ in CASES]
)
def test_which_addresses_are_loopback(family, address, allowed):
    assert is_loopback(family, address) is allowed


def test_a_loopback_server_answers():
    with socket.create_server(("127.0.0.1", 0)) as server, socket.create_connection(server.getsockname()) as client:
        peer, _ = server.accept()
        with peer:
            client.sendall(b"ping")
            assert peer.recv(4) == b"ping"


def test_a_unix_socket_answers(tmp_path: Path):
    path = str(tmp_path / "s")
    with socket.socket(socket.AF_UNIX) as server, socket.socket(socket.AF_UNIX) as client:
        server.bind(path)
        server.listen()
        client.connect(path)
        assert server.accept()[0] is not None


def test_tcp_udp_and_asyncio_connections_outside_are_refused(refused):
    with socket.socket() as sock, pytest.raises(NetworkRefused, match="192.0.2.1"):
        sock.connect(OUTSIDE)
    with socket.socket() as sock, pytest.raises(NetworkRefused):
        sock.connect_ex(OUTSIDE)
    with pytest.raises(NetworkRefused):
        socket.create_connection(OUTSIDE, timeout=1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, pytest.raises(NetworkRefused):
        udp.sendto(b"x", OUTSIDE)
    with pytest.raises(NetworkRefused):
        asyncio.run(asyncio.wait_for(asyncio.open_connection(*OUTSIDE), 1))
    assert len(refused) == 5


def test_a_test_that_swallows_the_refusal_still_fails(pytester: pytest.Pytester):
    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text())
    pytester.makepyfile(
        """
        import contextlib, socket

        def test_quietly_online():
            with contextlib.suppress(OSError), socket.socket() as sock:
                sock.connect(("192.0.2.1", 443))
        """
    )
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*the test tried to reach the network: ('192.0.2.1', 443)*"])
