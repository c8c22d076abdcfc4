"""Declared announcement fields: what a node gossips about itself beyond the core Peer fields.

Every key a node puts into its announcement's ``extra`` is declared here (or by a plugin with
:func:`declare`), with its type, the component that writes it and those that read it, so no
plugin has to guess another's keys. ``Node.announce`` and ``Node.set_serving`` refuse an
undeclared key; readers use :meth:`Field.read`, which returns None for an absent or ill-typed
value (a peer's announcement is untrusted input).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from meshcore.state import Peer

T = TypeVar("T")


class FieldError(ValueError):
    """An undeclared announcement field, or a value of the wrong type."""


@dataclass(frozen=True)
class Field(Generic[T]):
    """One declared key of ``Peer.extra``."""

    key: str
    kind: type[T]
    writer: str
    readers: str
    doc: str

    def read(self, peer: Peer | None) -> T | None:
        """The peer's value, or None when absent or of the wrong type."""
        value = None if peer is None else peer.extra.get(self.key)
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # JSON does not tell 3 from 3.0
        ok = isinstance(value, self.kind) and (self.kind is bool or not isinstance(value, bool))
        return value if ok else None

    def check(self, value: Any) -> None:
        if value is not None and not isinstance(value, self.kind):
            raise FieldError(f"announcement field {self.key!r} must be a "
                             f"{self.kind.__name__} or None, got {value!r:.60}")


FIELDS: dict[str, Field[Any]] = {}


def declare(field: Field[T]) -> Field[T]:
    """Declare a field (plugins call this at import); the same key twice must be the same."""
    known = FIELDS.setdefault(field.key, field)
    if known != field:
        raise FieldError(f"announcement field {field.key!r} is declared twice, by "
                         f"{known.writer!r} and {field.writer!r}: pick another key")
    return field


def checked(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` when every key is declared and typed right; raises :class:`FieldError`."""
    for key, value in fields.items():
        if key not in FIELDS:
            raise FieldError(f"announcement field {key!r} is not declared; declare it with "
                             "meshcore.fields.declare(Field(...)) (docs/plugins.md)")
        FIELDS[key].check(value)
    return fields


RTT_MS = declare(Field("rtt_ms", dict, "transport (quic)", "election (vram), console",
                       "peer id -> round-trip time in ms, as this node measures it"))
DEVICE = declare(Field("device", str, "backend (llamacpp)", "backend (llamacpp) workers",
                       "the accelerator kind this node's backend drives: cpu, cuda, metal..."))
STANDBY = declare(Field("standby", str, "backend (llamacpp)", "core (API routing), console",
                        "a model this node still serves while a new host loads it"))
ERROR = declare(Field("error", str, "backend", "console",
                      "why this node's backend failed (first line)"))
NAME = declare(Field("name", str, "core (--name)", "elections (e.g. pinning), console",
                     "a human name for the node"))
CAPS = declare(Field("caps", list, "core (the backend's Capabilities)", "elections",
                     "list of str, what the backend can do: 'host', 'rpc_worker', "
                     "'uses_workers'; absent (a client, or an older node): assume all"))
