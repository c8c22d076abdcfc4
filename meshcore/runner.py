"""Run a Node from the command line: signals, the start banner, clean exit codes."""

from __future__ import annotations

import logging
import signal
import sys

import anyio

from meshcore.config import NodeConfig
from meshcore.registry import RegistryError

log = logging.getLogger("meshcore")


def banner(node: object) -> str:
    from meshcore.node import Node

    assert isinstance(node, Node)
    cfg = node.config
    host = "127.0.0.1" if not cfg.listen_all else "0.0.0.0 (all interfaces)"
    lines = [f"mesh-llm node {node.id} ({node.state.me.role.value.lower()})",
             f"  API      http://{host}:{node.api_port}/v1"]
    console = node.uis.get("console")
    if console is not None and getattr(console, "port", None):
        lines.append(f"  console  http://{host}:{console.port}/")
    token = node.transport.invite_token()
    if token:
        lines.append(f"  join with: mesh-llm --join {token}")
    return "\n".join(lines)


async def _main(config: NodeConfig) -> None:
    from meshcore.node import Node

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


def run_node(config: NodeConfig) -> int:
    """Run until SIGINT/SIGTERM; returns the process exit code."""
    try:
        anyio.run(_main, config)
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # one line for users; the traceback only with --verbose
        if log.isEnabledFor(logging.DEBUG):
            log.exception("node failed")
        msg = str(exc)
        if hasattr(exc, "exceptions"):  # an ExceptionGroup from the task group
            msg = "; ".join(str(e) for e in exc.exceptions)
        print(f"error: {type(exc).__name__}: {msg}", file=sys.stderr)
        return 1
    return 0
