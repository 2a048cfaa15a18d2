"""Tests are isolated: DSPy's cache lives in a temporary folder, settings are reset per test,
and no test can reach the network: while the tests run, this process refuses every socket
connection except to loopback addresses (127.0.0.0/8, ::1, `localhost`) and unix sockets,
so only the 127.0.0.1 servers the tests start can be reached. A refused attempt raises
`NetworkRefused`, and the test that made it ends in an error even if the code under test
caught it. Host names other than `localhost` are refused without being looked up. Processes
the tests start (the command line, Ray's workers) are not covered."""

from __future__ import annotations

import ipaddress
import os
import socket
import tempfile
from typing import Any

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
os.environ.setdefault("DSPY_CACHEDIR", tempfile.mkdtemp(prefix="triage-dspy-cache-"))
for _variable in [v for v in os.environ if v.startswith("TRIAGE_")] + ["OPENAI_API_KEY", "ANTHROPIC_API_KEY"]:
    os.environ.pop(_variable, None)

import dspy  # noqa: E402
import pytest  # noqa: E402

from triage.settings import Settings  # noqa: E402


class NetworkRefused(ConnectionRefusedError):
    """A test tried to reach something other than this machine's loopback interface."""


def is_loopback(family: int, address: Any) -> bool:
    """Whether a socket address stays on this machine: loopback IPs, `localhost`, or not an IP socket at all."""
    if family not in (socket.AF_INET, socket.AF_INET6):
        return True  # unix sockets, netlink: no network
    host = address[0]
    if isinstance(host, bytes):
        host = host.decode()
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False  # any other name: refused without looking it up
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


class NetworkGuard:
    """Wraps the socket methods that reach an address; remembers what it refused."""

    def __init__(self) -> None:
        self.refused: list[str] = []

    def check(self, sock: socket.socket, address: Any) -> None:
        if not is_loopback(sock.family, address):
            self.refused.append(repr(address))
            raise NetworkRefused(f"the tests may not reach the network: {address!r} refused (loopback only)")

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        guard, cls = self, socket.socket
        connect, connect_ex, sendto = cls.connect, cls.connect_ex, cls.sendto

        def guarded_connect(sock: socket.socket, address: Any) -> None:
            guard.check(sock, address)
            return connect(sock, address)

        def guarded_connect_ex(sock: socket.socket, address: Any) -> int:
            guard.check(sock, address)
            return connect_ex(sock, address)

        def guarded_sendto(sock: socket.socket, data: Any, *args: Any) -> int:
            guard.check(sock, args[-1])  # sendto(data, address) or sendto(data, flags, address)
            return sendto(sock, data, *args)

        monkeypatch.setattr(cls, "connect", guarded_connect)
        monkeypatch.setattr(cls, "connect_ex", guarded_connect_ex)
        monkeypatch.setattr(cls, "sendto", guarded_sendto)


@pytest.fixture(scope="session")
def network_guard():
    guard = NetworkGuard()
    with pytest.MonkeyPatch.context() as monkeypatch:
        guard.install(monkeypatch)
        yield guard


@pytest.fixture(autouse=True)
def _no_network(network_guard):
    network_guard.refused.clear()
    yield network_guard
    refused, network_guard.refused[:] = list(network_guard.refused), []
    if refused:
        pytest.fail(f"the test tried to reach the network: {', '.join(refused)}", pytrace=False)


@pytest.fixture(autouse=True)
def _fresh_dspy_settings():
    with dspy.context(lm=None, adapter=None):
        yield


@pytest.fixture(autouse=True)
def _no_dotenv_of_the_developer(monkeypatch):
    """`Settings(...)` in a test reads no `.env` from the working directory: a test that wants one
    passes it (`resolve_settings(..., dotenv_path=...)`) or runs the command line in its own folder."""
    monkeypatch.setitem(Settings.model_config, "env_file", None)
