"""The host end of fast-path tunnels in a child process: relays that never wait for the GIL.

A split's per-token crossing passes the host's splice (:func:`.splice.take_raw`: llama-server's
rpc connection to the fast path). In the node's process that splice shares the interpreter
with the API, which relays every generated token to its client at the very moment llama-server
sends the next token's commands to the worker; the splice then waits for the proxy's Python
work. A thread of its own did not help (same GIL: measured, docs/benchmarks.md, "Issue 13");
a process shares nothing with the proxy. :class:`RelayProcess` starts ``python -m
meshcore_transport_quic.relayproc`` once, as soon as the node has a fast-path link (a
mesh formed; also on first use, should it have died), and hands it each accepted local
connection (its file descriptor over a ``SOCK_SEQPACKET`` socketpair) with where to dial;
the child dials the fast path and splices exactly as the node would (:mod:`.splice`,
:mod:`.adapter`, polling included).

Control messages are one JSON object per packet. Parent to child: ``{"id", "host", "port",
"key", "service", "hot"}`` (``hot``: the polling window, the node's policy) with the
connection's descriptor. Child to parent: ``{"id", "ok": true}`` once the tunnel is open, or
``{"id", "ok": false, "error", "refused"}`` (the parent keeps the connection and falls back
to QUIC); then ``{"id", "sent", "received"}`` totals while bytes flow and ``{"id", "end":
true, "cut", ...}`` last (``cut``: the peer's end vanished, :func:`.splice.was_cut`). The
child exits when the socketpair closes (the node stopped or died); the node kills it when it
stops.

On by default where the node may use at least 8 CPUs (:func:`process_wanted`: on an H200
split the API ran at 0.965-0.977 of raw llama.cpp with it, 0.926-0.950 without, then at
0.970-1.013 in thirteen more runs);
``MESH_LLM_RELAY_PROCESS=1`` or ``0`` forces it on or off. The tests run it through real
llama.cpp.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import Any

from meshcore.relay import Tally
from meshcore_transport_quic.adapter import HOT_MIN_CPUS, usable_cpus

log = logging.getLogger("meshcore.transport.fast")

PROCESS_ENV = "MESH_LLM_RELAY_PROCESS"
REPLY_TIMEOUT_S = 10.0  # the child's dial is bounded by fastpath.CONNECT_TIMEOUT (3 s)
COUNT_EVERY_S = 0.1  # how often the child reports a busy connection's byte totals
MAX_PACKET = 64 * 1024


def process_wanted(env: Mapping[str, str] | None = None, cpus: int | None = None) -> bool:
    """Whether takes go to a relay process: ``MESH_LLM_RELAY_PROCESS`` (1 or 0) when set,
    else where the node may use at least HOT_MIN_CPUS CPUs, as for the relays' polling (the
    child's hot relays take a core while tokens flow). Measured on an H200 split: API / raw
    0.965-0.977 with it against 0.926-0.950 without (docs/benchmarks.md, "Issue 13")."""
    value = (os.environ if env is None else env).get(PROCESS_ENV, "").strip().lower()
    if value:
        return value in ("1", "yes", "true", "on")
    return (usable_cpus() if cpus is None else cpus) >= HOT_MIN_CPUS


class RelayFailed(ConnectionError):
    """The child could not open the tunnel; ``refused``: the peer's port refused it."""

    def __init__(self, message: str, refused: bool) -> None:
        super().__init__(message)
        self.refused = refused


class RelayProcess:
    """The node's side of the relay child: start it, hand it connections, count their bytes."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self._ctl: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next = 0
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._counted: dict[int, tuple[Tally | None, int, int]] = {}  # id -> tally, seen
        self._cuts: dict[int, Callable[[], None]] = {}  # id -> called if it ends cut
        self.taken = 0  # connections the child relayed (tests, status)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self._ctl is not None

    def warm(self) -> None:
        """Start the child now, unless it runs: the first tunnel a split's host takes is
        llama-server's rpc connection as its load begins, which would otherwise wait for a
        Python start (docs/benchmarks.md, "Issue 13: the split's load step by step"). A child
        that cannot start is logged; the first take tries again."""
        if self.alive:
            return
        try:
            self._start()
        except (OSError, RuntimeError) as exc:  # RuntimeError: no running event loop
            log.warning("fast path: the relay process did not start: %r", exc)

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "meshcore_transport_quic.relayproc", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        ours.setblocking(False)
        self._ctl, self._loop = ours, asyncio.get_running_loop()
        self._loop.add_reader(ours.fileno(), self._readable)
        log.info("fast path: relay process %d relays this node's spliced tunnels",
                 self.proc.pid)

    async def take(self, conn: socket.socket, host: str, port: int, key: bytes,
                   service: str, tally: Tally | None, hot: float,
                   on_cut: Callable[[], None] | None = None) -> None:
        """Hand ``conn`` to the child, which dials ``host:port`` and splices (polling for
        ``hot`` seconds after each record); returns once the tunnel is open (``conn`` is then
        closed here: the child holds it; ``on_cut`` is called if the tunnel ends cut).
        RelayFailed when the child could not open it (``conn`` untouched), OSError when the
        child is gone."""
        if not self.alive:
            self._start()
        assert self._ctl is not None and self._loop is not None
        self._next += 1
        ident = self._next
        waiting = self._loop.create_future()
        self._waiting[ident] = waiting
        message = {"id": ident, "host": host, "port": port, "key": key.hex(),
                   "service": service, "hot": hot}
        try:
            socket.send_fds(self._ctl, [json.dumps(message).encode()], [conn.fileno()])
            reply = await asyncio.wait_for(waiting, REPLY_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            self._waiting.pop(ident, None)
            self.stop()  # a child that does not answer is of no use: the next take restarts
            raise OSError(f"the relay process did not take the connection: {exc!r}") from exc
        if not reply.get("ok"):
            raise RelayFailed(str(reply.get("error")), bool(reply.get("refused")))
        self._counted[ident] = (tally, 0, 0)
        if on_cut is not None:
            self._cuts[ident] = on_cut
        self.taken += 1
        conn.close()

    def _readable(self) -> None:
        ctl = self._ctl
        if ctl is None:
            return
        while True:
            try:
                packet = ctl.recv(MAX_PACKET)
            except BlockingIOError:
                return
            except OSError:
                packet = b""
            if not packet:  # the child is gone: its connections with it
                log.warning("fast path: the relay process ended; the next tunnel starts "
                            "another")
                self.stop()
                return
            self._dispatch(json.loads(packet))

    def _dispatch(self, message: dict[str, Any]) -> None:
        ident = message.get("id")
        if not isinstance(ident, int):
            return
        if "ok" in message:
            waiting = self._waiting.pop(ident, None)
            if waiting is not None and not waiting.done():
                waiting.set_result(message)
            return
        counted = self._counted.get(ident)
        if counted is None:
            return
        tally, sent, received = counted
        now_sent, now_received = int(message.get("sent", 0)), int(message.get("received", 0))
        if tally is not None:
            tally.add_sent(now_sent - sent)
            tally.add_received(now_received - received)
        if message.get("end"):
            del self._counted[ident]
            on_cut = self._cuts.pop(ident, None)
            if message.get("cut") and on_cut is not None:
                on_cut()
        else:
            self._counted[ident] = (tally, now_sent, now_received)

    def stop(self) -> None:
        """Kill the child (its connections end with it) and forget what it held."""
        ctl, proc, self._ctl, self.proc = self._ctl, self.proc, None, None
        if ctl is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(ctl.fileno())
            ctl.close()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        for waiting in self._waiting.values():
            if not waiting.done():
                waiting.set_exception(OSError("the relay process stopped"))
        self._waiting.clear()
        self._counted.clear()
        self._cuts.clear()


# ------------------------------------------------------------------------------ the child

class _Child:
    def __init__(self, ctl: socket.socket) -> None:
        self.ctl = ctl
        self.counts: dict[int, Tally] = {}
        self.reported: dict[int, tuple[int, int]] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def send(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):  # the node is gone: the reader stops us
            self.ctl.send(json.dumps(message).encode())

    def readable(self, stop: Callable[[], None]) -> None:
        while True:
            try:
                packet, fds, _, _ = socket.recv_fds(self.ctl, MAX_PACKET, 1)
            except BlockingIOError:
                return
            except OSError:
                packet, fds = b"", []
            if not packet:
                stop()
                return
            try:
                message = json.loads(packet)
                conn = socket.socket(fileno=fds[0])
            except (ValueError, IndexError, OSError) as exc:
                for fd in fds:
                    os.close(fd)
                log.warning("relay process: a bad request from the node: %r", exc)
                continue
            task = asyncio.get_running_loop().create_task(self.relay(message, conn))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def relay(self, message: dict[str, Any], conn: socket.socket) -> None:
        from meshcore_transport_quic.fastpath import FastPathError, open_fast_raw
        from meshcore_transport_quic.splice import take_raw

        ident = int(message["id"])
        tally = self.counts[ident] = Tally()

        async def open_raw(factory: Callable[[], asyncio.Protocol]) -> asyncio.Transport | None:
            try:
                remote = await open_fast_raw(message["host"], int(message["port"]),
                                             bytes.fromhex(message["key"]),
                                             message["service"], factory,
                                             float(message["hot"]))
            except FastPathError as exc:
                self.send({"id": ident, "ok": False, "error": str(exc),
                           "refused": isinstance(exc.__cause__, ConnectionRefusedError)})
                return None
            self.send({"id": ident, "ok": True})
            return remote

        conn.setblocking(False)
        cut: list[bool] = []
        try:
            if not await take_raw(conn, open_raw, tally, lambda: cut.append(True)):
                conn.close()  # our copy: the node keeps its own and uses QUIC
        finally:
            del self.counts[ident]
            self.reported.pop(ident, None)
            self.send({"id": ident, "end": True, "sent": tally.sent,
                       "received": tally.received, "cut": bool(cut)})

    async def report(self) -> None:
        while True:
            await asyncio.sleep(COUNT_EVERY_S)
            for ident, tally in list(self.counts.items()):
                now = (tally.sent, tally.received)
                if self.reported.get(ident, (0, 0)) != now:
                    self.reported[ident] = now
                    self.send({"id": ident, "sent": now[0], "received": now[1]})


async def _serve(fd: int) -> None:
    ctl = socket.socket(fileno=fd)
    ctl.setblocking(False)
    child = _Child(ctl)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def stop() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(fd, child.readable, stop)
    reporter = loop.create_task(child.report())
    try:
        await done
    finally:
        reporter.cancel()
        for task in list(child.tasks):
            task.cancel()
        await asyncio.gather(reporter, *child.tasks, return_exceptions=True)


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: "
                        "[relay process] %(message)s")
    run: Callable[..., None] = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop  # as the node: relays run ~1.5x faster on it

        run = uvloop.run
    with contextlib.suppress(KeyboardInterrupt):
        run(_serve(int(argv[0])))


if __name__ == "__main__":
    main(sys.argv[1:])
