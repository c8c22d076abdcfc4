"""Hand-over: the old llama-server keeps answering while a plan change loads its successor.

When a plan change keeps this node the host of the same model and the running llama-server
needs no worker (it was solo, e.g. ``--split`` alone before a worker joins), the old server
becomes the :class:`Standby`; once the new one is healthy the API moves to it and the old one
stops when its slots are idle (at most RETIRE_GRACE_S). If the new one fails (e.g. out of
memory with both loaded), the old one stops and the plan is re-applied the plain way. When
another node becomes the host instead, the standby answers (announced as ``standby``, the mesh
routes requests here) until that host is ready.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass

import anyio

from meshcore import fields
from meshcore.components import NodeHandle
from meshcore.plan import Plan
from meshcore.state import Serving
from meshcore_backend_llamacpp.commands import Layout
from meshcore_backend_llamacpp.process import Child, slots_busy
from meshcore_backend_llamacpp.race import race
from meshcore_backend_llamacpp.want import Host, Idle, Want

log = logging.getLogger("meshcore.llamacpp")

RETIRE_GRACE_S = 60.0  # longest wait for a handed-over llama-server's requests to finish


@dataclass
class Standby:
    """A llama-server that keeps serving while its successor loads; ``stack`` stops it."""

    stack: contextlib.AsyncExitStack
    child: Child
    port: int
    model: str


def may_hand_over(served: Plan, lay: Layout, new: Plan | None, wanted: Want, me: str) -> bool:
    """Whether the llama-server of ``served`` (laid out as ``lay``) may keep serving while
    ``new`` loads: ``new`` serves the same model, the old server uses no worker (a worker's
    rpc-server serves one client at a time, so old and new could not share it), and this node
    either stays the host or leaves the plan for another host (not to become a worker: its
    device memory is needed for the rpc-server)."""
    if new is None or new.model != served.model or lay.rpc_peers:
        return False
    if isinstance(wanted, Host):
        return True
    return isinstance(wanted, Idle) and new.host_id is not None and new.host_id != me


def keeps_answering(model: str, plan: Plan, me: str) -> bool:
    """Whether a standby serving ``model`` should keep answering under ``plan``: another
    node hosts the same model (and the standby answers until it is ready)."""
    return model == plan.model and plan.host_id is not None and plan.host_id != me


class HandOver:
    """Owns the standby llama-server, if any: keeps it, routes to it, retires it."""

    def __init__(self, node: NodeHandle) -> None:
        self.node = node
        self.standby: Standby | None = None
        self.handovers = 0

    @property
    def alive(self) -> bool:
        """Whether a standby is still running."""
        return self.standby is not None and self.standby.child.alive

    def keep(self, standby: Standby) -> None:
        """Let ``standby`` serve on (its stack is now ours to close)."""
        self.standby = standby
        self.handovers += 1
        log.info("plan changed: llama-server (port %d) keeps serving until the new one is "
                 "ready", standby.port)

    def stands_by(self, plan: Plan) -> bool:
        """Whether the standby should keep answering under ``plan`` (see keeps_answering)."""
        standby = self.standby
        return (standby is not None and standby.child.alive
                and keeps_answering(standby.model, plan, self.node.id))

    async def retire(self, *, graceful: bool = False) -> None:
        """Stop the standby, if any; ``graceful``: first let the requests it is still
        generating finish (up to RETIRE_GRACE_S)."""
        standby, self.standby = self.standby, None
        me = self.node.state.me
        if fields.STANDBY.read(me) is not None:  # the mesh stops routing here first (also
            self.node.set_serving(me.serving, standby=None)  # when announced but never kept)
        if standby is None:
            return
        try:
            if graceful:
                with anyio.move_on_after(RETIRE_GRACE_S):
                    while standby.child.alive and await slots_busy(standby.port):
                        await anyio.sleep(0.25)
        finally:
            with anyio.CancelScope(shield=True):
                await standby.stack.aclose()
            log.info("stopped the previous llama-server (port %d)", standby.port)

    async def serve_as_standby(self, plan: Plan, wake: anyio.Event) -> None:
        """No longer the host: keep the standby answering (announced as ``standby``; the
        node routes requests here) until the new host is ready, then let its requests finish
        and stop it. Returns early when ``wake`` is set (a plan change)."""
        assert plan.host_id is not None
        self.node.set_serving(Serving.IDLE, standby=plan.model)
        log.info("%s now hosts %s; this node's llama-server answers until it is ready",
                 plan.host_id, plan.model)
        await race(wake, (), functools.partial(self._until_ready, plan.host_id))

    async def _until_ready(self, host_id: str) -> None:
        state, gen = self.node.state, -1
        while self.alive:
            host = state.view().get(host_id)
            if host is not None and host.serving is Serving.READY:
                break
            with anyio.move_on_after(1):
                gen = await state.changed(gen)
        await self.retire(graceful=True)
