"""Child processes tied to mesh-llm's life: own process group, PR_SET_PDEATHSIG, logs, health.

Every child runs in a new session (its own process group) so one ``killpg`` stops it and
anything it spawned. On Linux the child also asks the kernel for SIGKILL when its parent dies
(``prctl(PR_SET_PDEATHSIG)``), so even ``kill -9`` of mesh-llm leaves no orphans. The parent
is the thread that forked: asyncio forks from the event loop's thread, which lives as long as
the node. Output goes to ``<log_dir>/<name>.log``; its tail is quoted when the child fails.

llama.cpp attaches gdb to itself on abort to print a backtrace when gdb is installed. In a
mesh the host's llama-server aborts whenever a worker goes away ("Remote RPC server crashed"),
an expected event, and the backtrace delayed its exit by ~0.5 s on a 2-core VM (the split's
recovery waits for it) and filled the quoted log with gdb's lines. So children get
``GGML_NO_BACKTRACE=1`` unless ``MESH_LLM_BACKTRACE=1`` asks for the backtraces.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio

log = logging.getLogger("meshcore.llamacpp")

PR_SET_PDEATHSIG = 1
STOP_GRACE_S = 3.0
BACKTRACE_ENV = "MESH_LLM_BACKTRACE"


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a llama.cpp child starts with: ``env`` (default: ours) plus
    ``GGML_NO_BACKTRACE=1``, unless ``MESH_LLM_BACKTRACE`` is set to anything but 0."""
    out = dict(os.environ if env is None else env)
    if os.environ.get(BACKTRACE_ENV, "0").strip() in ("", "0"):
        out.setdefault("GGML_NO_BACKTRACE", "1")
    return out


class ChildFailed(RuntimeError):
    """A child exited or never became healthy; the message quotes its log's tail."""


def _pdeathsig_hook() -> Any:
    """A preexec_fn that makes the kernel SIGKILL the child when mesh-llm dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: the child only calls it
    parent = os.getpid()

    def hook() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(1)

    return hook


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (the child binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# What a crashing llama.cpp prints after its own message: gdb's backtrace (llama.cpp attaches
# gdb on abort) and the loader's noise. Not the cause, so never quoted as such.
NOISE = re.compile(r"^\s*(#\d+\s|\[New LWP|\[New Thread|\[Inferior|\[Thread debugging|"
                   r"Using host libthread_db|0x[0-9a-f]+ in |warning: |\(gdb\)|ptrace|"
                   r"Could not attach|No stack\.|Detaching|==== |"
                   r"\d+\t(in )?\S*[/.]\S*(: No such file or directory\.)?$|"  # gdb: a source line
                   r"\S+ \(.*\) at \S+:\d+$)")  # gdb: the frame it stopped in
CAUSE = re.compile(r"error|failed|GGML_ASSERT|exception|terminate called|abort|invalid|"
                   r"cannot|unable|not found|out of memory", re.I)


def tail(path: Path, lines: int = 20, start: int = 0) -> str:
    """The last ``lines`` lines of the log from byte ``start`` on (this run's part), gdb's
    backtrace and loader noise left out."""
    try:
        with path.open("rb") as fh:
            fh.seek(max(start, path.stat().st_size - 65536))
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    kept = [line for line in text.splitlines() if line.strip() and not NOISE.match(line)]
    return "\n".join(kept[-lines:])


def exit_text(code: int | None) -> str:
    """``exited with code 1``, or ``was killed by SIGSEGV`` for a signal (negative code)."""
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def cause(text: str) -> str | None:
    """The line that says why a llama.cpp process died: the last line of its log's tail that
    says "error" (llama.cpp's specific message; the generic "failed ..." after it is the
    fallback), or None. ``tail`` already dropped gdb's frames."""
    found = [line.strip() for line in text.splitlines() if CAUSE.search(line)]
    errors = [line for line in found if "error" in line.lower()]
    best = errors or found
    return best[-1] if best else None


class Child:
    """One supervised process. Use :func:`supervised` so it is stopped on every exit path."""

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path,
                 env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = log_dir / f"{name}.log"
        self.env = child_env(env)
        self.proc: asyncio.subprocess.Process | None = None
        self.started_at = 0.0
        self.log_start = 0  # where this run's lines begin in the (appended) log

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as logf:
            logf.write(f"\n==== {time.strftime('%H:%M:%S')} {' '.join(self.argv)}\n".encode())
            logf.flush()
            self.log_start = logf.tell()
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    *self.argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                    env=self.env, start_new_session=True, preexec_fn=_pdeathsig_hook())
            except OSError as exc:
                raise ChildFailed(f"{self.name} could not start: {self.argv[0]}: {exc}") from None
        self.started_at = time.monotonic()
        log.info("started %s (pid %s), log %s", self.name, self.pid, self.log_path)

    async def wait(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()

    def failure(self, what: str) -> ChildFailed:
        """The error for a failed child: its first line says what happened and, when the log
        shows it, llama.cpp's own error line; then the log's last lines."""
        last = tail(self.log_path, start=self.log_start)
        why = (cause(last) or "")[:300]
        return ChildFailed(f"{self.name} (pid {self.pid}) {what}" + (f": {why}" if why else "")
                           + f"; last lines of {self.log_path}:\n{last}")

    async def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace`` seconds. Shield the caller."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        with anyio.move_on_after(grace):
            await proc.wait()
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        log.info("stopped %s (pid %s, exit %s)", self.name, proc.pid, proc.returncode)


@contextlib.asynccontextmanager
async def supervised(name: str, argv: Sequence[str], log_dir: Path,
                     env: Mapping[str, str] | None = None) -> AsyncIterator[Child]:
    """Start a child and stop its process group when the block exits, however it exits."""
    child = Child(name, argv, log_dir, env)
    await child.start()
    try:
        yield child
    finally:
        with anyio.CancelScope(shield=True):
            await child.stop()


async def http_status(port: int, path: str, timeout: float = 2.0) -> int | None:
    """Status code of ``GET path`` on 127.0.0.1:``port``, or None when it does not answer.

    A bare HTTP/1.0 request: polling through httpx would log every probe at INFO."""
    with anyio.move_on_after(timeout):
        try:
            stream = await anyio.connect_tcp("127.0.0.1", port)
        except OSError:
            return None
        async with stream:
            try:
                await stream.send(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
                head = await stream.receive(1024)
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                return None
        parts = head.split(b" ", 2)
        if len(parts) >= 2 and parts[1].isdigit():
            return int(parts[1])
    return None


async def slots_busy(port: int, timeout: float = 2.0) -> bool:
    """Whether llama-server on ``port`` is generating for anyone (its ``/slots``, enabled by
    default, says ``is_processing``); False when it does not answer or says nothing usable."""
    with anyio.move_on_after(timeout):
        try:
            stream = await anyio.connect_tcp("127.0.0.1", port)
        except OSError:
            return False
        body = bytearray()
        async with stream:
            try:
                await stream.send(b"GET /slots HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                while len(body) < 4 << 20:
                    body += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                pass
        try:
            slots = json.loads(bytes(body).partition(b"\r\n\r\n")[2])
        except ValueError:
            return False
        return isinstance(slots, list) and any(
            isinstance(slot, dict) and slot.get("is_processing") for slot in slots)
    return False


HEALTH_POLL_S = 0.05  # a loading llama-server answers 503 at once; 0.2 s cost 0.1 s a load


async def wait_healthy(child: Child, port: int, timeout: float, every: float = 5.0) -> None:
    """Poll llama-server's /health until 200 (every HEALTH_POLL_S, so the API serves as soon
    as it loaded); log progress; fail on exit or timeout."""
    started = time.monotonic()
    last_note = started
    while True:
        if not child.alive:
            raise child.failure(f"{exit_text(child.returncode)} while loading")
        if await http_status(port, "/health") == 200:
            log.info("%s is healthy after %.1f s", child.name, time.monotonic() - started)
            return
        now = time.monotonic()
        if now - started > timeout:
            raise child.failure(f"not healthy after {timeout:.0f} s")
        if now - last_note >= every:
            last_note = now
            log.info("waiting for %s to load: %.0f s (log %s)", child.name, now - started,
                     child.log_path)
        await anyio.sleep(HEALTH_POLL_S)


async def wait_listening(child: Child, port: int, timeout: float) -> None:
    """Wait until ``child`` accepts TCP connections on 127.0.0.1:``port``."""
    started = time.monotonic()
    while True:
        if not child.alive:
            raise child.failure(f"{exit_text(child.returncode)} while starting")
        try:
            stream = await anyio.connect_tcp("127.0.0.1", port)
        except OSError:
            if time.monotonic() - started > timeout:
                raise child.failure(f"not listening on port {port} after {timeout:.0f} s"
                                    ) from None
            await anyio.sleep(0.1)
        else:
            await stream.aclose()
            return
