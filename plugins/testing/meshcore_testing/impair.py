"""A userspace impairment relay: forwards UDP or TCP to a target, adding delay, jitter and loss.

This kernel has no netem, so fault tests and ``bench/`` scripts put this relay between two
nodes instead: point one node at the relay's port and every byte pays the configured delay on
each direction (so the round trip grows by twice ``delay_ms``). UDP datagrams are also dropped
with probability ``loss`` and, with jitter, may be reordered, like a real lossy path. TCP keeps
its byte order (jitter never reorders a stream) and ignores ``loss``: a TCP stream cannot lose
bytes, only be late.

From synchronous code (tests, benchmarks)::

    with start_relay("udp", ("127.0.0.1", 5000), Impairment(delay_ms=75, loss=0.02)) as relay:
        ...  # talk to 127.0.0.1:relay.port; relay.impairment can be changed while it runs

From a running event loop: ``await serve_udp(...)`` / ``await serve_tcp(...)``. From a shell:
``python -m meshcore_testing.impair udp 127.0.0.1:5000 --delay-ms 75 --loss 0.02``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, cast

Address = tuple[str, int]
Kind = Literal["udp", "tcp"]
UDP_IDLE_S = 120.0  # an upstream socket with no traffic for this long is closed


@dataclass(frozen=True)
class Impairment:
    """What the relay does to traffic, on each direction separately."""

    delay_ms: float = 0.0  # added one way; the round trip grows by twice this
    jitter_ms: float = 0.0  # each packet/chunk gets +- uniform(jitter) on top of the delay
    loss: float = 0.0  # probability of dropping a UDP datagram (0..1); TCP ignores it

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.jitter_ms < 0:
            raise ValueError(f"delay_ms and jitter_ms must be >= 0, got {self.delay_ms}, "
                             f"{self.jitter_ms}")
        if not 0 <= self.loss <= 1:
            raise ValueError(f"loss is a probability (0..1), got {self.loss}")

    def delay_s(self, rng: random.Random) -> float:
        """One packet's delay in seconds."""
        jitter = rng.uniform(-self.jitter_ms, self.jitter_ms) if self.jitter_ms else 0.0
        return max(0.0, self.delay_ms + jitter) / 1000

    def drops(self, rng: random.Random) -> bool:
        return self.loss > 0 and rng.random() < self.loss


@dataclass
class Relay:
    """A running relay: where it listens, what it does, and what it did."""

    kind: Kind
    target: Address
    impairment: Impairment
    host: str = "127.0.0.1"
    port: int = 0
    forwarded: int = 0  # datagrams (udp) or chunks (tcp) delivered
    dropped: int = 0
    most_in_flight: int = 0  # tcp: the most chunks read but not yet delivered, at once
    rng: random.Random = field(default_factory=random.Random)

    def later(self, send: object, data: bytes) -> None:
        """Deliver ``data`` with ``send(data)`` after this relay's delay, unless it is lost."""
        if self.kind == "udp" and self.impairment.drops(self.rng):
            self.dropped += 1
            return
        loop = asyncio.get_running_loop()
        loop.call_later(self.impairment.delay_s(self.rng), self._deliver, send, data)

    def _deliver(self, send: object, data: bytes) -> None:
        self.forwarded += 1
        with contextlib.suppress(OSError, RuntimeError):
            send(data)  # type: ignore[operator]


# ---------------------------------------------------------------- UDP


class _Upstream(asyncio.DatagramProtocol):
    """The relay's socket towards the target for one client address."""

    def __init__(self, relay: Relay, front: asyncio.DatagramTransport, client: Address) -> None:
        self.relay, self.front, self.client = relay, front, client
        self.transport: asyncio.DatagramTransport | None = None
        self.last = asyncio.get_running_loop().time()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.last = asyncio.get_running_loop().time()
        self.relay.later(lambda d: self.front.sendto(d, self.client), data)


class _Front(asyncio.DatagramProtocol):
    """The relay's listening socket: one upstream socket per client address (like a NAT)."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.transport: asyncio.DatagramTransport | None = None
        self.upstreams: dict[Address, _Upstream] = {}
        self.pending: dict[Address, list[bytes]] = {}
        self.opening: set[asyncio.Future[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        client = (addr[0], addr[1])
        up = self.upstreams.get(client)
        if up is not None and up.transport is not None:
            up.last = asyncio.get_running_loop().time()
            transport = up.transport
            self.relay.later(lambda d: transport.sendto(d), data)
            return
        if client in self.pending:
            self.pending[client].append(data)
            return
        self.pending[client] = [data]
        task = asyncio.ensure_future(self._open(client))
        self.opening.add(task)
        task.add_done_callback(self.opening.discard)

    async def _open(self, client: Address) -> None:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        front = self.transport
        _, up = await loop.create_datagram_endpoint(
            lambda: _Upstream(self.relay, front, client), remote_addr=self.relay.target)
        self.upstreams[client] = up
        for data in self.pending.pop(client, []):
            self.datagram_received(data, client)

    def reap(self, now: float) -> None:
        for client, up in list(self.upstreams.items()):
            if now - up.last > UDP_IDLE_S and up.transport is not None:
                up.transport.close()
                del self.upstreams[client]

    def close(self) -> None:
        for up in self.upstreams.values():
            if up.transport is not None:
                up.transport.close()
        if self.transport is not None:
            self.transport.close()


async def serve_udp(relay: Relay, started: asyncio.Future[None] | None = None) -> None:
    """Relay UDP from ``relay.host:relay.port`` (0 = any; the bound port is written back) to
    ``relay.target`` until cancelled."""
    loop = asyncio.get_running_loop()
    _, front = await loop.create_datagram_endpoint(lambda: _Front(relay),
                                                   local_addr=(relay.host, relay.port))
    assert front.transport is not None
    relay.port = front.transport.get_extra_info("sockname")[1]
    if started is not None:
        started.set_result(None)
    try:
        while True:
            await asyncio.sleep(UDP_IDLE_S / 4)
            front.reap(loop.time())
    finally:
        front.close()


# ---------------------------------------------------------------- TCP


async def _pipe(relay: Relay, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy one direction with the relay's delay, keeping byte order; half-close at EOF.

    Reading runs ahead of delivery (each chunk is due ``delay`` after it was read, never
    before the one read before it), so a message that arrives in k pieces pays the delay
    once, like a slow link, not k times."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=1024)

    async def read() -> None:
        due = 0.0  # a chunk is never delivered before the one read before it
        try:
            while data := await reader.read(65536):
                due = max(due, loop.time() + relay.impairment.delay_s(relay.rng))
                await queue.put((due, data))
                relay.most_in_flight = max(relay.most_in_flight, queue.qsize())
        except (OSError, RuntimeError):
            pass
        await queue.put((due, b""))  # EOF (or a reset: close after what was read)

    reading = asyncio.ensure_future(read())
    try:
        while True:
            due, data = await queue.get()
            await asyncio.sleep(max(0.0, due - loop.time()))
            if not data:
                break
            relay.forwarded += 1
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (OSError, RuntimeError):
        writer.close()
    finally:
        reading.cancel()


async def serve_tcp(relay: Relay, started: asyncio.Future[None] | None = None) -> None:
    """Relay TCP connections from ``relay.host:relay.port`` to ``relay.target`` until
    cancelled; each direction is delayed separately (no loss: see the module docstring)."""
    async def handle(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        try:
            t_reader, t_writer = await asyncio.open_connection(*relay.target)
        except OSError:
            c_writer.close()
            return
        try:
            await asyncio.gather(_pipe(relay, c_reader, t_writer),
                                 _pipe(relay, t_reader, c_writer))
        finally:
            for w in (c_writer, t_writer):
                w.close()

    server = await asyncio.start_server(handle, relay.host, relay.port)
    relay.port = server.sockets[0].getsockname()[1]
    if started is not None:
        started.set_result(None)
    async with server:
        await server.serve_forever()


# ---------------------------------------------------------------- from synchronous code


@contextlib.contextmanager
def start_relay(kind: Kind, target: Address, impairment: Impairment | None = None, *,
                host: str = "127.0.0.1", port: int = 0, seed: int | None = None
                ) -> Iterator[Relay]:
    """Run a relay in a background thread (its own event loop) for the ``with`` block."""
    if kind not in ("udp", "tcp"):
        raise ValueError(f"relay kind {kind!r} is unknown; use 'udp' or 'tcp'")
    relay = Relay(kind, target, impairment or Impairment(), host, port, rng=random.Random(seed))
    loop = asyncio.new_event_loop()
    ready: asyncio.Future[None] = loop.create_future()
    serve = serve_udp if kind == "udp" else serve_tcp
    task = loop.create_task(serve(relay, ready))

    def run() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(task)

    thread = threading.Thread(target=run, name=f"impair-{kind}-relay", daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(_started(ready, task), loop).result(15)
        yield relay
    finally:
        loop.call_soon_threadsafe(task.cancel)
        thread.join(10)
        loop.close()


async def _started(ready: asyncio.Future[None], task: asyncio.Task[None]) -> None:
    """Wait until the relay listens; re-raise why it could not (e.g. the port is taken)."""
    await asyncio.wait([ready, task], timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    if not ready.done():
        raise TimeoutError("the impairment relay did not start listening within 10 s")


def _address(text: str) -> Address:
    host, _, port = text.rpartition(":")
    return (host.strip("[]") or "127.0.0.1", int(port))


def main(argv: list[str] | None = None) -> None:
    """``python -m meshcore_testing.impair udp|tcp TARGET_HOST:PORT [--listen PORT] [--delay-ms N]
    [--jitter-ms N] [--loss P]``: run a relay until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m meshcore_testing.impair", description=__doc__)
    parser.add_argument("kind", choices=("udp", "tcp"))
    parser.add_argument("target", type=_address, help="where to forward, HOST:PORT")
    parser.add_argument("--listen", type=_address, default=("127.0.0.1", 0),
                        help="HOST:PORT to listen on (default 127.0.0.1:0, any port)")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="added each way")
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--loss", type=float, default=0.0, help="UDP drop probability, 0..1")
    args = parser.parse_args(argv)
    impairment = Impairment(args.delay_ms, args.jitter_ms, args.loss)
    with start_relay(args.kind, args.target, impairment, host=args.listen[0],
                     port=args.listen[1]) as relay:
        print(f"{args.kind} relay on {relay.host}:{relay.port} -> "
              f"{args.target[0]}:{args.target[1]} ({impairment})", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
