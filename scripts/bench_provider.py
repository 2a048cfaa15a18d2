"""The simulated provider alone at `make bench`'s load: can it serve what the benchmark asks of it?

Starts `tests/fake_provider.py` in its own process exactly as `scripts/bench.py` does (200 ms
latency by default) and drives it from this process with a light client: one asyncio event
loop, `--concurrency` keep-alive connections speaking raw HTTP/1.1 over asyncio streams (no
DSPy, no HTTP library), each connection sending its next request as soon as its reply is
read. The request bodies are the chat requests the pipeline's two stages send (DSPy's
ChatAdapter formats them once, before the clock starts, for `--rows` synthetic transcripts),
so the provider parses and answers the same text as in the benchmark.

Prints requests/s (requests answered over the span from the first request sent to the last
reply read), that rate as a share of the ceiling concurrency / latency (320 requests/s at
64 and 200 ms), round trips, the CPU each side used and the load average. A provider that
serves close to the ceiling alone, on a fraction of a core, does not bind the benchmark, whose
pipeline asks it for at most the same. With `--control` the same client then drives a server
that does nothing but wait the latency: what the machine itself allows at that moment (on a
loaded machine both fall short of the ceiling together).

Usage: python scripts/bench_provider.py [--requests N] [--latency S] [--concurrency C] [--rows R] [--control]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from bench import DEFAULT_MODEL, Provider

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # every process: the bundled price list


def request_bodies(rows: int, model: str) -> list[bytes]:
    """Both stages' chat requests for `rows` transcripts like bench.py's, as DSPy's ChatAdapter writes them."""
    import dspy

    from triage.programs import CallTriager, DetailExtractor
    from triage.settings import split_model

    signatures = [CallTriager().triage.predict.signature, DetailExtractor().extract.predict.signature]
    adapter = dspy.ChatAdapter()
    bodies = []
    for i in range(rows):
        transcript = f"Caller {i}: a neighbour at {i % 900 + 10} Elm Street reports smoke and a man shouting, case {i}."
        for signature in signatures:
            messages = adapter.format(signature, [], {"transcript": transcript})
            body = {"model": split_model(model)[1], "messages": messages, "temperature": 0.0, "max_tokens": 4000}
            bodies.append(json.dumps(body).encode())
    return bodies


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, from /proc."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def connection(
    host: str, port: int, path: str, bodies: list[bytes], counter: list[int], total: int, round_trips: list[float]
) -> int:
    """One keep-alive connection: send, read the whole reply, repeat until `total` requests are taken; 200s."""
    reader, writer = await asyncio.open_connection(host, port)
    ok = 0
    try:
        while counter[0] < total:
            body = bodies[counter[0] % len(bodies)]
            counter[0] += 1
            sent = time.monotonic()
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                f"Authorization: Bearer bench\r\nContent-Length: {len(body)}\r\n\r\n".encode("latin-1")
                + body
            )
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            round_trips.append(time.monotonic() - sent)
            ok += status == 200
    finally:
        writer.close()
    return ok


async def drive(url: str, bodies: list[bytes], concurrency: int, total: int) -> tuple[float, int, list[float]]:
    """Wall time from the first request sent to the last reply read, requests answered 200, round trips."""
    parts = urlsplit(url)
    path = parts.path.rstrip("/") + "/chat/completions"
    counter, round_trips = [0], []
    started = time.monotonic()
    oks = await asyncio.gather(
        *(connection(parts.hostname, parts.port, path, bodies, counter, total, round_trips) for _ in range(concurrency))
    )
    return time.monotonic() - started, sum(oks), round_trips


# `--control`: a server that does nothing but wait `latency` and send one fixed 200, on the same
# kind of asyncio streams. Its rate is what this machine allows at that moment; the provider is
# measured against it as well as against the ceiling.
NULL_SERVER = """
import asyncio, sys
LATENCY = float(sys.argv[1])
BODY = b'{"choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}]}'
REPLY = b"HTTP/1.1 200 OK\\r\\nContent-Type: application/json\\r\\nContent-Length: %d\\r\\n\\r\\n%s" % (len(BODY), BODY)
async def connection(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\\r\\n\\r\\n")
            length = [l for l in head.split(b"\\r\\n") if l.lower().startswith(b"content-length:")]
            await reader.readexactly(int(length[0].split(b":", 1)[1]))
            await asyncio.sleep(LATENCY)
            writer.write(REPLY)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()
async def main():
    server = await asyncio.start_server(connection, "127.0.0.1", 0, backlog=2048)
    print("READY http://127.0.0.1:%d/v1" % server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()
asyncio.run(main())
"""


def measure(name: str, process: subprocess.Popen, url: str, args: argparse.Namespace, bodies: list[bytes]) -> str:
    """Drive one server; its figures as one line."""
    server_cpu, client_cpu = cpu_seconds(process.pid), time.process_time()
    wall, ok, round_trips = asyncio.run(drive(url, bodies, args.concurrency, args.requests))
    server_cpu, client_cpu = cpu_seconds(process.pid) - server_cpu, time.process_time() - client_cpu
    rate, ceiling = args.requests / wall, args.concurrency / args.latency
    round_trips.sort()
    return (
        f"{name:<14} requests/s {rate:.1f}  ceiling {ceiling:.0f} ({rate / ceiling:.1%})"
        f"  answered 200: {ok}/{args.requests}"
        f"  round trip median {1000 * round_trips[len(round_trips) // 2]:.1f} ms"
        f" p99 {1000 * round_trips[int(len(round_trips) * 0.99)]:.1f} ms"
        f"  CPU server {server_cpu / wall:.0%} of a core, client {client_cpu / wall:.0%}  wall {wall:.1f}s"
        f"  load average {os.getloadavg()[0]:.1f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000, help="requests in all (10,000 rows x 2 stages)")
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rows", type=int, default=1_000, help="distinct transcripts the bodies cycle through")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--control", action="store_true", help="then the same load on a do-nothing server")
    args = parser.parse_args()
    bodies = request_bodies(args.rows, args.model)
    print(
        f"# {args.requests} requests, {args.latency * 1000:.0f} ms latency, {args.concurrency} in flight, "
        f"{os.cpu_count()} cores, request bodies {len(bodies[0])} B (triage), {len(bodies[1])} B (details)",
        flush=True,
    )
    provider = Provider(args.latency, None)
    try:
        provider.reset()
        line = measure("fake provider", provider.process, provider.url, args, bodies)
        stats = provider.stats()
    finally:
        provider.close()
    span = (stats["last_request_monotonic"] or 0) - (stats["first_request_monotonic"] or 0)
    mean_in_flight = stats["in_flight_seconds"] / span if span > 0 else 0.0
    print(f"{line}  in flight at the provider: peak {stats['max_in_flight']} mean {mean_in_flight:.1f}", flush=True)
    if args.control:
        null = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", NULL_SERVER, str(args.latency)], stdout=subprocess.PIPE, text=True
        )
        try:
            url = null.stdout.readline().split()[1]
            print(measure("do-nothing", null, url, args, bodies), flush=True)
        finally:
            null.terminate()
            null.wait(timeout=30)
    return 0 if stats["outcomes"]["ok"] == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())
