"""A worker: runs ggml-rpc-server for the host, its hash cache seeded from our own model copy.

Before the rpc-server is offered (it starts meanwhile), the worker writes the cache entries of
the layers the host will put on it (predicted from the plan and the device the host announced),
so those weights never cross the network; the rest of the model follows while the rpc-server
runs (a later plan may give this worker other layers), once the host's llama-server has loaded
(``rpc_loaded``). See hashcache.py.

Seeding ahead (:meth:`RpcWorker.seed_ahead`): the election settles 1 s after the last change
of the mesh (``settle_s``) before it decides, but the plan it is forming is known at once
(``node.elect``). A node that this plan makes a worker starts seeding its layers then, so
that the plan's own pass finds them hashed (the index) and the rpc-server starts sooner.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import anyio
import anyio.to_process
import anyio.to_thread
from anyio import BrokenWorkerProcess

from meshcore import fields
from meshcore.components import NodeHandle
from meshcore.plan import Plan
from meshcore.state import Serving
from meshcore_backend_llamacpp import commands, hashcache
from meshcore_backend_llamacpp.host import LOADED
from meshcore_backend_llamacpp.machine import Machine
from meshcore_backend_llamacpp.process import Child, free_port, supervised, wait_listening
from meshcore_backend_llamacpp.race import Woken, race
from meshcore_backend_llamacpp.want import Worker, want

T = TypeVar("T")
log = logging.getLogger("meshcore.llamacpp")

LISTEN_TIMEOUT_S = 60.0
LOADED_WAIT_S = 300.0  # the longest the background seeding waits for the host's load


def predicted_layers(plan: Plan, host_device: str | None, n_layer: int,
                     me: str) -> set[int] | None:
    """The layers the host's llama-server will put on the worker ``me``, given the device
    kind the host announced (None when it announced none, or the layer count is unknown).
    A CPU host keeps the output matrix (``commands.OUTPUT_ON_CPU``): the output layer's big
    tensor is not the worker's to seed then, only its norm, which is under the threshold."""
    if host_device is None or not n_layer:
        return None
    lay = commands.layout(plan, host_has_gpu=host_device != "cpu", n_layer=n_layer)
    layers = commands.worker_layers(lay, n_layer, me)
    return layers - {n_layer} if lay.output_on_host else layers


@dataclass
class Ahead:
    """A pass seeding the ``layers`` of a plan not yet in force; ``done`` once it ended."""

    layers: set[int]
    done: anyio.Event = field(default_factory=anyio.Event)
    written: int = 0


class RpcWorker:
    """Runs rpc-server for the plans that make this node a worker; keeps its status."""

    def __init__(self, node: NodeHandle, machine: Machine,
                 on_ready: Callable[[], None]) -> None:
        self.node = node
        self.machine = machine
        self.on_ready = on_ready  # called once rpc-server listens
        self.rpc: Child | None = None
        self.rpc_port: int | None = None
        self.seeded_bytes: int | None = None
        self.ahead: Ahead | None = None  # the last pass that seeded ahead of a plan
        self.serving = False  # serve() runs
        self.seeding: str | None = None  # which pass writes the cache now (status)
        self._warming: anyio.Event | None = None  # set once the hashing process is up
        self.hashing_pid: int | None = None  # that process, once warm() started it

    async def serve(self, plan: Plan, wake: anyio.Event) -> None:
        """Seed while rpc-server starts, then offer it to tunnels as ``rpc`` until ``wake`` is set
        (returns) or it fails (raises)."""
        self.serving = True  # its passes write the cache: none ahead meanwhile
        try:
            await self._serve(plan, wake)
        finally:
            self.serving = False

    async def _serve(self, plan: Plan, wake: anyio.Event) -> None:
        node, bins = self.node, self.machine.bins
        assert bins is not None
        node.set_serving(Serving.LOADING, error=None)
        cache_dir = self.machine.hash_dir
        port = free_port()
        argv = commands.rpc_server_argv(bins.rpc_server, port=port, threads=self.machine.threads)
        env = {**os.environ, "LLAMA_CACHE": str(self.machine.rpc_cache)}
        # rpc-server starts (a GPU's context, ~0.2 s) while the cache is seeded: it reads an
        # entry only when the host asks for it, and no host can before the offer below
        async with supervised("rpc-server", argv, self.machine.log_dir, env) as child:
            self.rpc = child
            try:
                with self._doing("this worker's layers"):
                    seeded = await race(wake, [child],
                                        functools.partial(self._seed, plan, cache_dir))
                if isinstance(seeded, Woken):
                    return
                up = await race(wake, [child], functools.partial(
                    wait_listening, child, port, LISTEN_TIMEOUT_S))
                if isinstance(up, Woken):
                    return
                self.on_ready()
                node.offer_service("rpc", port)
                self.rpc_port = port
                node.set_serving(Serving.RPC, error=None)
                await race(wake, [child],
                           functools.partial(self._seed_rest, cache_dir, seeded.value,
                                             plan.host_id))
            finally:
                node.withdraw_service("rpc", port)
                self.rpc_port = None

    def _my_layers(self, plan: Plan) -> set[int] | None:
        host = self.node.state.view().get(plan.host_id or "")
        return predicted_layers(plan, fields.DEVICE.read(host), self.machine.n_layer,
                                self.node.id)

    async def _seed(self, plan: Plan, cache_dir: Path) -> dict[str, str] | None:
        """Drop cache entries this node did not write, then pre-fill rpc-server's hash cache
        from our own copy of the plan's model, if any:
        the tensors of the layers this worker will hold first (the rest follows once the
        rpc-server runs, see ``_seed_rest``). Returns what the second pass may skip, or None
        when there is no second pass."""
        self.seeded_bytes = None
        ahead, self.ahead = self.ahead, None
        if ahead is not None:  # one pass at a time on the cache (its ledger, its index)
            await ahead.done.wait()
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Before every start, whether or not we have the model: what an earlier host made
        # rpc-server save (or anyone else left) must not reach the next host (hashcache.py).
        await anyio.to_thread.run_sync(hashcache.prune_foreign, cache_dir)
        info = self.node.model
        if info is None or info.path is None or info.name != plan.model:
            return None
        if await anyio.to_thread.run_sync(hashcache.cache_complete, info.path, cache_dir):
            self.seeded_bytes = 0
            return None
        layers = self._my_layers(plan)
        if layers is None:
            await self._seed_all(info.path, cache_dir)
            return None
        written, known = await self._seed_layers(info.path, cache_dir, layers)
        self.seeded_bytes = written + (ahead.written if ahead is not None else 0)
        return known

    def seed_ahead(self, plan: Plan) -> bool:
        """Start seeding the layers ``plan`` would give this node, before it is the plan in
        force (the election is settling; see the module doc). Only one such pass at a time,
        only for a plan of our model that makes us a worker, and only while :meth:`serve`
        does not run (its passes write the cache too). True if a pass started."""
        info, ahead = self.node.model, self.ahead
        if (self.serving or info is None or info.path is None or info.name != plan.model
                or not isinstance(want(plan, self.node.id), Worker)
                or (ahead is not None and not ahead.done.is_set())):
            return False
        layers = self._my_layers(plan)
        if layers is None or (ahead is not None and ahead.layers == layers):
            return False
        self.ahead = Ahead(layers)
        self.node.task_group.start_soon(self._ahead_pass, info.path, self.ahead)
        return True

    async def _ahead_pass(self, model: Path, ahead: Ahead) -> None:
        cache_dir = self.machine.hash_dir
        try:
            with self._doing("ahead of the plan"):
                cache_dir.mkdir(parents=True, exist_ok=True)
                ahead.written, _ = await self._seed_layers(model, cache_dir, ahead.layers,
                                                           " ahead of the plan")
        except Exception as exc:  # only load time is lost: the plan's pass redoes it
            log.warning("seeding ahead of the plan failed: %r", exc)
        finally:
            ahead.done.set()

    @contextlib.contextmanager
    def _doing(self, what: str) -> Iterator[None]:
        """Shown as ``seeding`` in the status while the block runs (the plan's pass may
        start while a pass ahead of it ends: the later one keeps the word)."""
        self.seeding = what
        try:
            yield
        finally:
            if self.seeding == what:
                self.seeding = None

    async def host_loaded(self, host_id: str | None) -> bool:
        """Wait until the host announces that its llama-server holds this worker's layers
        (``rpc_loaded``, host.py), at most LOADED_WAIT_S (a host that never says so). The
        background pass reads the rest of the model file and writes gigabytes of entries:
        during the host's load it slowed that load by a quarter on a 2-core machine
        (docs/benchmarks.md, "Issue 13: seeding ahead of the plan, ..."). True if it was said."""
        state, gen = self.node.state, -1
        with anyio.move_on_after(LOADED_WAIT_S):
            while self.node.id not in (LOADED.read(state.view().get(host_id or "")) or ()):
                gen = await state.changed(gen)
            return True
        return False

    # Hashing runs in a worker process: hashing a big GGUF in a thread would hold the GIL for
    # long stretches and starve the event loop (gossip, tunnels). What the rpc-server waits
    # for is hashed on one thread per CPU there (nothing of ours runs beside it yet); the
    # background pass on one, so it does not compete with the rpc-server serving the host's
    # load (or, on a CPU, computing).

    async def warm(self) -> None:
        """Start the hashing process now, with what it imports (anyio keeps an idle one for
        the next call): a node that joins a mesh may be made a worker within a second, and
        its first pass would otherwise wait for a Python start first (0.1-0.4 s on 2 cores;
        docs/benchmarks.md, "Issue 13: the split's load step by step")."""
        if self._warming is not None:
            return
        self._warming = anyio.Event()
        try:
            self.hashing_pid = await anyio.to_process.run_sync(hashcache.warm)
        except Exception as exc:  # the pass itself starts one again, and reports its failure
            log.debug("starting the hashing process ahead failed: %r", exc)
        finally:
            self._warming.set()

    async def _in_process(self, call: Callable[[], T]) -> T:
        """``call()`` in the hashing process (once the one warming up is ready)."""
        if self._warming is not None:
            await self._warming.wait()
        return await anyio.to_process.run_sync(call, cancellable=True)

    async def _seed_all(self, model: Path, cache_dir: Path) -> None:
        started = time.monotonic()
        self.seeded_bytes = await self._in_process(functools.partial(
            hashcache.seed_cache, model, cache_dir, workers=None))
        log.info("seeded the rpc cache with %s bytes of %s in %.1f s", self.seeded_bytes,
                 model.name, time.monotonic() - started)

    async def _seed_layers(self, model: Path, cache_dir: Path, layers: set[int],
                           when: str = "") -> tuple[int, dict[str, str]]:
        """Bytes written and tensor name -> entry name, for the tensors of ``layers``."""
        started = time.monotonic()
        names = await anyio.to_thread.run_sync(functools.partial(
            hashcache.tensors_of_layers, model, layers, self.machine.n_layer))
        written, known = await self._in_process(functools.partial(
            hashcache.seed_tensors, model, cache_dir, names, workers=None))
        log.info("seeded the rpc cache with the %d tensors of this worker's %d layers "
                 "(%s bytes) in %.1f s%s; the rest of %s follows in the background",
                 len(names), len(layers), written, time.monotonic() - started, when,
                 model.name)
        return written, known

    async def _seed_rest(self, cache_dir: Path, known: dict[str, str] | None,
                         host_id: str | None = None) -> None:
        """Seed the rest of the model while the rpc-server runs (a later plan may give this
        worker other layers), then wait. A failure here only costs load time later."""
        info = self.node.model
        if known is not None and info is not None and info.path is not None:
            with self._doing("the rest, after the host's load"):
                await self.host_loaded(host_id)
            started = time.monotonic()
            try:
                with self._doing("the rest"):
                    more = await self._in_process(functools.partial(
                        hashcache.seed_cache, info.path, cache_dir, known=known, workers=1))
            except (OSError, ValueError, BrokenWorkerProcess) as exc:  # the last: its process
                # died (a file cut short under its mapping raises SIGBUS there, say)
                log.warning("seeding the rest of the rpc cache failed: %r", exc)
            else:
                self.seeded_bytes = (self.seeded_bytes or 0) + more
                log.info("seeded the rest of the rpc cache (%d bytes) in %.1f s", more,
                         time.monotonic() - started)
        await anyio.sleep_forever()
