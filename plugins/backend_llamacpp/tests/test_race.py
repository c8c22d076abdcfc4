"""``race``: a step ends with its result, early on a plan change, or with its error."""

from __future__ import annotations

import anyio
import pytest
from meshcore_backend_llamacpp.race import Done, Woken, race

pytestmark = pytest.mark.anyio


async def test_work_that_finishes_is_done() -> None:
    async def work() -> int:
        return 7

    assert await race(anyio.Event(), (), work) == Done(7)


async def test_a_plan_change_ends_the_work_early() -> None:
    wake = anyio.Event()

    async def work() -> int:
        wake.set()
        await anyio.sleep_forever()
        return 0

    assert await race(wake, (), work) == Woken()


async def test_the_works_own_error_is_raised() -> None:
    async def work() -> None:
        raise OSError("no room")

    with pytest.raises(OSError, match="no room"):
        await race(anyio.Event(), (), work)
