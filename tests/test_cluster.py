"""The same command on an existing Ray cluster: a head and a worker node started with `ray start`.

The cluster lives in a temporary folder of its own and is stopped by the sessions its `ray start`
commands ran in (`tests.processes`), never with `ray stop`, which stops every Ray on the machine."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from tests.doubles import triage_run_command
from tests.fake_provider import FakeProvider, expected_answer
from tests.processes import session_processes, stop_session

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], env=env, capture_output=True, text=True, timeout=180)


def ray_start(*args: str, env: dict[str, str], sessions: list[int]) -> subprocess.CompletedProcess:
    """`ray start` in a session of its own, whose id (its pid) goes to `sessions`: every daemon it leaves
    running carries it, so teardown stops exactly these and no other Ray on the machine."""
    process = subprocess.Popen(
        [RAY, "start", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    sessions.append(process.pid)
    stdout, stderr = process.communicate(timeout=180)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.fixture
def two_node_cluster():
    temp = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths must fit in 107 bytes
    # Ray 2.60 clusters use token auth (~/.ray/auth_token); `ray start` on a worker must be told so.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_TMPDIR": temp}
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    sessions: list[int] = []
    try:
        head = ray_start(
            "--head",
            f"--port={port}",
            "--num-cpus=1",
            "--include-dashboard=false",
            f"--temp-dir={temp}",
            "--node-ip-address=127.0.0.1",
            env=env,
            sessions=sessions,
        )
        assert head.returncode == 0, head.stderr
        address = f"127.0.0.1:{port}"
        worker = ray_start(
            f"--address={address}",
            "--num-cpus=1",
            "--node-ip-address=127.0.0.1",
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            env=env,
            sessions=sessions,
        )
        assert worker.returncode == 0, worker.stderr
        assert all(session_processes(session) for session in sessions)  # each left its daemons running
        yield address, env
    finally:
        for session in reversed(sessions):  # the worker node first, then the head
            stop_session(session)
        shutil.rmtree(temp, ignore_errors=True)


def test_run_on_an_existing_two_node_cluster_with_a_shared_rate_limit(tmp_path, two_node_cluster):
    address, env = two_node_cluster
    key = "sk-cluster-only-in-dotenv-77"
    transcripts = [f"cluster call {i}: smoke from a garage on Pine Street" for i in range(40)]
    (tmp_path / "calls.jsonl").write_text("".join(json.dumps({"transcript": t}) + "\n" for t in transcripts))
    with FakeProvider(api_key=key, rpm=1200, latency=0.02) as provider:
        (tmp_path / ".env").write_text(f"TRIAGE_API_KEY={key}\n")
        run_env = {k: v for k, v in env.items() if not k.startswith("TRIAGE_")}
        run_env.update(RAY_ADDRESS=address, TRIAGE_CACHE="false")
        result = subprocess.run(
            triage_run_command(provider.url, "--concurrency", "8", "--rpm", "1200"),
            cwd=tmp_path,
            env=run_env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        stats = provider.stats()
    assert result.returncode == 0, result.stderr
    assert "40 rows out, 0 with errors" in result.stdout
    assert stats["outcomes"]["401"] == 0 and stats["outcomes"]["429"] <= 2
    frame = pd.read_parquet(tmp_path / "out")
    assert len(frame) == 40
    for row in frame.itertuples():
        assert row.summary == expected_answer(row.transcript)["summary"]
    status = ray_cli("status", f"--address={address}", env=env)
    assert status.stdout.count(" node_") == 2, status.stdout  # the run joined the cluster; it started none
