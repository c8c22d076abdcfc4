"""Run a Node from the command line: signals, the start banner, clean exit codes."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import signal
import sys

import anyio

from meshcore.config import ConfigError, NodeConfig
from meshcore.node import Node
from meshcore.registry import RegistryError

log = logging.getLogger("meshcore")


def banner(node: Node) -> str:
    cfg = node.config
    host = "127.0.0.1" if not cfg.listen_all else "0.0.0.0 (all interfaces)"
    # the role is elected after start-up: only a client knows what it is at this point
    kind = "client" if node.state.me.is_client else "electing a host"
    lines = [f"mesh-llm node {node.id} ({kind})",
             f"  API      http://{host}:{node.api_port}/v1"]
    for name, ui in node.uis.items():
        if getattr(ui, "port", None):
            lines.append(f"  {name:<8} http://{host}:{ui.port}/")
    token = node.transport.invite_token()
    if token:
        lines.append(f"  join with: mesh-llm --join {token}")
    return "\n".join(lines)


async def _main(config: NodeConfig) -> None:
    node = Node(config)

    async def watch_signals() -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("%s received: stopping", signal.Signals(signum).name)
                node.stop()
                return

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch_signals)
        await tg.start(node.run)
        print(banner(node), file=sys.stderr, flush=True)
        await node.wait_stopped()
        tg.cancel_scope.cancel()


def leaf_exceptions(exc: BaseException) -> list[BaseException]:
    """The real errors inside (nested) exception groups, in order."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaf_exceptions(inner)]
    return [exc]


def use_uvloop() -> bool:
    """uvloop when installed (tunnel relays run ~1.5x faster on it, docs/benchmarks.md),
    unless ``MESH_LLM_UVLOOP=0``."""
    if os.environ.get("MESH_LLM_UVLOOP", "1") == "0":
        return False
    return importlib.util.find_spec("uvloop") is not None


def run_node(config: NodeConfig) -> int:
    """Run until SIGINT/SIGTERM; returns the process exit code (0 after a signal).

    Errors raised inside the node's task group arrive wrapped in exception groups; the user
    sees one line for the first real error (the traceback only with ``--verbose``).
    """
    try:
        anyio.run(_main, config, backend_options={"use_uvloop": use_uvloop()})
    except BaseException as exc:
        leaves = [e for e in leaf_exceptions(exc)
                  if not isinstance(e, KeyboardInterrupt | asyncio.CancelledError)]
        if not leaves:  # Ctrl-C before the signal watcher was installed
            return 0
        for leaf in leaves:
            if isinstance(leaf, SystemExit | GeneratorExit):
                raise
        if log.isEnabledFor(logging.DEBUG):
            log.error("node failed", exc_info=exc)
        return report_error(leaves[0])
    return 0


def report_error(exc: BaseException) -> int:
    """Print one ``error:`` line for ``exc``; returns the exit code (2: bad usage)."""
    if isinstance(exc, ConfigError | RegistryError):
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if isinstance(exc, OSError) and exc.strerror and not exc.filename:
        print(f"error: {exc.strerror}", file=sys.stderr)  # no "[Errno N]" noise
    elif isinstance(exc, OSError | ValueError | LookupError | RuntimeError):
        print(f"error: {exc}", file=sys.stderr)
    else:
        print(f"error: {type(exc).__name__}: {exc} (run with --verbose for the traceback)",
              file=sys.stderr)
    return 1
