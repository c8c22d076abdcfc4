"""The fast path is chosen on every start: a key is registered before the handshake message
that carries it leaves, so the accepting node's immediate probe never meets an unknown key
(before, 5 of 7 two-node starts fell back to QUIC for the life of the link). The race depends
on timing, so the second test makes it certain: the dialer takes its time reading WELCOME
(it registered its key after that read before the fix; the accepting node probes at once)."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import pytest
from meshcore_transport_quic import handshake
from meshcore_transport_quic.frames import Frame, Kind
from quic_helpers import QuicMesh, wait_for

pytestmark = pytest.mark.anyio

STARTS = 20


async def test_fast_path_is_chosen_in_every_two_node_start(
        quic_mesh: QuicMesh, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="meshcore.transport.quic")
    chosen = 0
    for i in range(STARTS):
        a = await quic_mesh.add(node_id=f"a{i:02d}", joins=())
        b = await quic_mesh.add(node_id=f"b{i:02d}", joins=(a.transport.invite_token() or "",))
        await wait_for(lambda a=a, b=b: b.id in a.transport.links and a.id in b.transport.links,
                       10, f"start {i}: a and b linked")
        # both ends probed the fast path once they linked; wait for the verdict
        await wait_for(lambda a=a, b=b: a.transport.links[b.id].fast_ok is not None
                       and b.transport.links[a.id].fast_ok is not None, 10, f"start {i}: probes")
        if a.transport.link(b.id) == b.transport.link(a.id) == "TCP+AES-GCM":
            chosen += 1
        a.stop()
        b.stop()
        await anyio.sleep(0.05)
    fell_back = [r.getMessage() for r in caplog.records if "fast path unreachable" in
                 r.getMessage()]
    assert chosen == STARTS and not fell_back, (chosen, fell_back)


async def test_a_slow_dialer_still_gets_the_fast_path(
        quic_mesh: QuicMesh, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.WARNING, logger="meshcore.transport.quic")
    read = handshake.read_frame

    async def slow_welcome(reader: Any) -> Frame:
        frame = await read(reader)
        if frame.kind is Kind.WELCOME:
            await anyio.sleep(0.5)  # the accepting node probes meanwhile
        return frame

    monkeypatch.setattr(handshake, "read_frame", slow_welcome)
    a = await quic_mesh.add()
    b = await quic_mesh.add()
    await wait_for(lambda: b.id in a.transport.links and a.id in b.transport.links, 10,
                   "a and b linked")
    await wait_for(lambda: a.transport.links[b.id].fast_ok is not None, 10, "a's probe")
    assert a.transport.link(b.id) == "TCP+AES-GCM", a.transport.links[b.id].fast_why
    assert not [r for r in caplog.records if "fast path unreachable" in r.getMessage()]
