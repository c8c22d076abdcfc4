"""Run one step of the backend's work while watching its children and the plan.

Every wait of the host, the worker and the hand-over goes through :func:`race`: the step ends
with its result (:class:`Done`), or early when the plan changes (:class:`Woken`), or raises
``ChildFailed`` when a watched child exits.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import anyio

from meshcore_backend_llamacpp.process import Child, exit_text

T = TypeVar("T")


@dataclass(frozen=True)
class Done(Generic[T]):
    """The work finished with ``value``."""

    value: T


@dataclass(frozen=True)
class Woken:
    """The wake event fired first: what this node must run may have changed."""


@dataclass
class _Outcome(Generic[T]):
    values: list[T] = field(default_factory=list)
    error: Exception | None = None


async def race(wake: anyio.Event, children: Sequence[Child],
               work: Callable[[], Awaitable[T]]) -> Done[T] | Woken:
    """Run ``work`` while watching ``children`` and ``wake``.

    Returns :class:`Done` when work finished, :class:`Woken` when ``wake`` was set first;
    raises ChildFailed when a child exits, and re-raises work's own error.
    """
    outcome: _Outcome[T] = _Outcome()

    async with anyio.create_task_group() as tg:

        async def do_work() -> None:
            try:
                outcome.values.append(await work())
            except Exception as exc:  # re-raised below, outside the task group
                outcome.error = exc
            tg.cancel_scope.cancel()

        async def watch(c: Child) -> None:
            code = await c.wait()
            if outcome.error is None:
                outcome.error = c.failure(exit_text(code))
            tg.cancel_scope.cancel()

        async def on_wake() -> None:
            await wake.wait()
            tg.cancel_scope.cancel()

        for c in children:
            tg.start_soon(watch, c)
        tg.start_soon(on_wake)
        tg.start_soon(do_work)
    if outcome.error is not None:
        raise outcome.error
    if outcome.values:
        return Done(outcome.values[0])
    return Woken()
