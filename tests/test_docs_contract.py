"""docs/plugins.md documents every public name of the plugin contract.

Each kind of name must appear in its own section, in a set form: node handle members as
`node.NAME`, fields, capabilities and ApiEvent fields as table rows, hooks as
'### `hook(args)`' headings with the hookspec's arguments, the test kit's names and fixtures
as inline code in 'The test kit'. The checker itself is tested on small docs and on the real
doc with one name taken out, so each check is known to fail when a name goes missing.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from collections.abc import Callable, Iterable
from pathlib import Path

import meshcore_testing
import pytest
from meshcore_testing.harness import MeshHarness

from meshcore import fields, hookspecs
from meshcore.api import ApiEvent
from meshcore.components import Capabilities, NodeHandle
from meshcore.config import NodeConfig
from meshcore.fields import FIELDS, Field

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"
FIXTURES = ("mesh_harness", "mesh_process")

# ---------------------------------------------------------------- the contract's names


def node_handle_members() -> list[str]:
    """Public members of the NodeHandle protocol: annotated attributes, properties, methods."""
    names = set(typing.get_type_hints(NodeHandle)) | set(dir(NodeHandle))
    return sorted(n for n in names if not n.startswith("_"))


def field_keys() -> list[str]:
    """Keys of the fields the core declares (FIELDS also grows with each imported plugin's
    own declarations, which its own docs cover)."""
    core = [v for v in vars(fields).values() if isinstance(v, Field)]
    assert all(FIELDS.get(f.key) is f for f in core), "a core field is not declared"
    return sorted(f.key for f in core)


def hooks() -> dict[str, list[str]]:
    """Hook name -> its argument names, from meshcore.hookspecs."""
    return {name: list(inspect.signature(obj).parameters)
            for name, obj in sorted(vars(hookspecs).items())
            if name.startswith("meshcore_") and inspect.isfunction(obj)}


def dataclass_fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


# ---------------------------------------------------------------- the checker


def section(doc: str, title: str) -> str:
    """The text under the heading whose title starts with ``title`` (any level), up to the
    next heading of the same or a higher level; '' when there is no such heading."""
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        found = re.match(r"(#+) (.*)", line)
        if found and found.group(2).startswith(title):
            level = len(found.group(1))
            body = []
            for rest in lines[i + 1:]:
                head = re.match(r"(#+) ", rest)
                if head and len(head.group(1)) <= level:
                    break
                body.append(rest)
            return "\n".join(body)
    return ""


def as_node_member(name: str) -> str:
    return rf"`node\.{re.escape(name)}\b"


def as_table_row(name: str) -> str:
    return rf"^\|\s*`{re.escape(name)}`\s*\|"


def as_code(name: str) -> str:
    return rf"`[^`\n]*(?<![\w.]){re.escape(name)}(?!\w)[^`\n]*`"


def undocumented(text: str, names: Iterable[str], pattern: Callable[[str], str]) -> list[str]:
    """The names for which ``pattern(name)`` does not match ``text``."""
    return [n for n in names if not re.search(pattern(n), text, flags=re.M)]


def undocumented_hooks(doc: str, specs: dict[str, list[str]]) -> list[str]:
    """Hooks without a '### `name(args)`' heading whose arguments are the hookspec's."""
    headings = dict(re.findall(r"^### `(meshcore_\w+)\(([^)]*)\)`", doc, flags=re.M))
    return [name for name, args in specs.items()
            if [a.strip() for a in headings.get(name, "-").split(",") if a.strip()] != args]


# (section title, names, form): what docs/plugins.md must hold
CHECKS: dict[str, tuple[str, Callable[[], list[str]], Callable[[str], str]]] = {
    "node handle": ("The node handle", node_handle_members, as_node_member),
    "fields": ("Declared announcement fields", field_keys, as_table_row),
    "capabilities": ("Capabilities", lambda: dataclass_fields(Capabilities), as_table_row),
    "api event": ("The API observer", lambda: dataclass_fields(ApiEvent), as_table_row),
    "test kit": ("The test kit", lambda: sorted(meshcore_testing.__all__), as_code),
    "fixtures": ("The test kit", lambda: list(FIXTURES), as_code),
}


def missing(doc: str) -> dict[str, list[str]]:
    """Everything undocumented, by kind (empty: the doc covers the contract)."""
    out = {}
    for kind, (title, names, form) in CHECKS.items():
        text = section(doc, title)
        gone = undocumented(text, names(), form) if text else [f"<section {title!r}>"]
        if gone:
            out[kind] = gone
    if gone := undocumented_hooks(doc, hooks()):
        out["hooks"] = gone
    return out


# ---------------------------------------------------------------- the real doc


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC_PATH.read_text()


def test_the_contract_has_names() -> None:
    """Guards the introspection: an empty list would make every check pass."""
    assert {"announce", "plan", "serve_inbound", "task_group"} <= set(node_handle_members())
    assert {"rtt_ms", "caps", "name"} <= set(field_keys())
    assert dataclass_fields(Capabilities) == ["host", "rpc_worker", "uses_workers"]
    assert "first_byte_s" in dataclass_fields(ApiEvent)
    assert hooks()["meshcore_register_uis"] == ["register"]
    assert {"MeshHarness", "wait_until", "HealthPoller"} <= set(meshcore_testing.__all__)


def test_docs_document_the_whole_contract(doc: str) -> None:
    assert missing(doc) == {}, f"undocumented in docs/plugins.md: {missing(doc)}"


def test_harness_config_names_are_the_real_ones(doc: str) -> None:
    """The NodeConfig fields the test kit says ``mesh.add(**config)`` takes, and those it
    says the harness sets, are real fields; with ``add``'s own keywords they are all."""
    kit = re.sub(r"\s+", " ", section(doc, "The test kit"))
    found = re.search(r"`\*\*config` takes these `NodeConfig` fields: (.*?)\. "
                      r"The harness sets (.*?) itself", kit)
    assert found, "the test kit no longer says which NodeConfig fields add() takes"
    takes, sets = (set(re.findall(r"`(\w+)`", re.sub(r"\([^)]*\)", "", group)))
                   for group in found.groups())
    real = {f.name for f in dataclasses.fields(NodeConfig)}
    own = set(inspect.signature(MeshHarness.add).parameters) & real
    assert takes and sets and not takes & sets
    assert takes | sets <= real, f"not NodeConfig fields: {(takes | sets) - real}"
    assert real - takes - sets - own == set(), "NodeConfig fields the test kit leaves out"


# ---------------------------------------------------------------- the checker can fail


SMALL_DOC = """\
## The node handle

| `node.id` | this node |

## Declared announcement fields

| `rtt_ms` | `dict` |

### `meshcore_plan_changed(node, plan)`

### `meshcore_mesh_changed(node)`
"""


def test_checker_reports_a_missing_name() -> None:
    handle = section(SMALL_DOC, "The node handle")
    assert undocumented(handle, ["id", "announce"], as_node_member) == ["announce"]
    table = section(SMALL_DOC, "Declared announcement fields")
    assert undocumented(table, ["rtt_ms", "caps"], as_table_row) == ["caps"]
    assert undocumented("`node.idle`", ["id"], as_node_member) == ["id"]
    assert undocumented("`mesh_harness_x`", ["mesh_harness"], as_code) == ["mesh_harness"]
    assert undocumented("mesh_harness, unquoted", ["mesh_harness"], as_code) == ["mesh_harness"]
    specs = {"meshcore_plan_changed": ["node", "plan"],
             "meshcore_mesh_changed": ["node", "view"],
             "meshcore_api_request": ["node", "event"]}
    assert undocumented_hooks(SMALL_DOC, specs) == ["meshcore_mesh_changed",
                                                    "meshcore_api_request"]


def test_checker_reports_a_missing_section() -> None:
    assert section(SMALL_DOC, "The test kit") == ""
    assert missing(SMALL_DOC)["test kit"] == ["<section 'The test kit'>"]


@pytest.mark.parametrize("kind", sorted(CHECKS))
def test_each_check_fails_without_its_name(doc: str, kind: str) -> None:
    """Take one name's documentation out of the real doc: that check reports it."""
    _title, names, form = CHECKS[kind]
    name = names()[0]
    without = re.sub(form(name), "", doc, flags=re.M)
    assert name in missing(without).get(kind, []), (kind, name)


def test_hook_check_fails_without_its_heading_or_with_wrong_args(doc: str) -> None:
    name, args = next(iter(hooks().items()))
    heading = f"### `{name}({', '.join(args)})`"
    assert heading in doc
    assert name in missing(doc.replace(heading, "### nothing"))["hooks"]
    wrong = f"### `{name}({', '.join([*args, 'extra'])})`"
    assert name in missing(doc.replace(heading, wrong))["hooks"]
