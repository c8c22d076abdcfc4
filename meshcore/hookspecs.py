"""Every hook a meshcore plugin can implement; the docstrings are the contract."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

from meshcore import PROJECT

if TYPE_CHECKING:
    import typer
    from starlette.routing import BaseRoute

    from meshcore.api import ApiEvent
    from meshcore.components import UI, Backend, Elect, NodeHandle, Transport
    from meshcore.config import NodeConfig
    from meshcore.plan import Plan
    from meshcore.state import MeshView

hookspec = pluggy.HookspecMarker(PROJECT)

# What each registration hook's ``register`` takes: (name, factory or function); Register is
# the loose form any of them accepts.
Register = Callable[[str, Callable[..., Any]], None]
RegisterTransport = Callable[[str, "Callable[[NodeHandle], Transport]"], None]
RegisterElection = Callable[[str, "Elect"], None]
RegisterBackend = Callable[[str, "Callable[[NodeHandle], Backend]"], None]
RegisterUI = Callable[[str, "Callable[[NodeHandle, int | None], UI]"], None]


# ---------------------------------------------------------------- registration (sync)


@hookspec
def meshcore_register_transports(register: RegisterTransport) -> None:
    """Register transports: call ``register(name, factory)``; ``factory(node)`` (node: the
    :class:`meshcore.components.NodeHandle`) returns a :class:`meshcore.components.Transport`.
    Sync, every plugin is called, results ignored.

    :param register: core-owned callback; a duplicate name is an error.
    """


@hookspec
def meshcore_register_elections(register: RegisterElection) -> None:
    """Register election policies: ``register(name, elect)`` where ``elect(view, request)``
    returns a :class:`meshcore.plan.Plan`. ``elect`` must be sync, pure and deterministic: the
    same view and request give the same plan on every node. Its settings arrive in
    ``request.options`` (``--election-opt KEY=VALUE``); ``request.delegate(name, view)`` runs
    another registered election. If it raises or returns no Plan, the node keeps the plan in
    force and logs the plugin's name. Sync, every plugin is called.

    :param register: core-owned callback; a duplicate name is an error.
    """


@hookspec
def meshcore_register_backends(register: RegisterBackend) -> None:
    """Register inference backends: ``register(name, factory)``; ``factory(node)`` returns a
    :class:`meshcore.components.Backend` (its ``capabilities`` are announced and every
    election respects them; its ``api_base()`` is tunneled to every node by the core).
    Sync, every plugin is called.

    :param register: core-owned callback; a duplicate name is an error.
    """


@hookspec
def meshcore_register_uis(register: RegisterUI) -> None:
    """Register user interfaces: ``register(name, factory)``; ``factory(node, port)`` returns
    a :class:`meshcore.components.UI`, started when the user asks for it with
    ``--ui NAME[=PORT]`` (``--console [PORT]`` is ``--ui console``); ``port`` is None when
    none was given. Sync, every plugin is called.

    :param register: core-owned callback; a duplicate name is an error.
    """


@hookspec
def meshcore_register_commands(app: typer.Typer) -> None:
    """Add sub-commands to the ``mesh-llm`` typer app. Sync, every plugin is called; import
    heavy modules inside the command functions so ``mesh-llm --help`` stays fast.

    :param app: the root typer application.
    """


# ---------------------------------------------------------------- lifecycle and events


@hookspec(historic=True)
def meshcore_configure(config: NodeConfig) -> None:
    """The node's configuration, once it is validated. Historic: a plugin registered later is
    still called with it. Sync, every plugin is called, results ignored.

    :param config: the immutable node configuration.
    """


@hookspec
def meshcore_mesh_changed(node: NodeHandle, view: MeshView) -> None:
    """The mesh view changed (a peer joined, left or changed its announcement). Sync and
    called from the node's task: schedule async work on your own component, never block.
    An observer that raises is logged with its plugin's name and skipped.

    :param node: the running node.
    :param view: the new immutable view.
    """


@hookspec
def meshcore_plan_changed(node: NodeHandle, plan: Plan) -> None:
    """The elected plan changed (called after the backend was asked to apply it). Sync, every
    plugin is called, results ignored; one that raises is logged and skipped.

    :param node: the running node.
    :param plan: the new plan.
    """


@hookspec
def meshcore_api_request(node: NodeHandle, event: ApiEvent) -> None:
    """An OpenAI API request on this node: called when it starts and when it finishes
    (``event.phase``), with the status, usage and timings when the response carried them.
    Sync, called in the request's task: never block. One that raises is logged and skipped.

    :param node: the running node.
    :param event: a :class:`meshcore.api.ApiEvent`.
    """


@hookspec
def meshcore_console_routes(node: NodeHandle) -> list[BaseRoute]:
    """Extra starlette routes for the web console. Sync, every plugin is called; the console
    mounts every returned route (a plugin that raises is logged and skipped).

    :param node: the running node.
    :return: a list of ``starlette.routing.BaseRoute``.
    """
    return []
