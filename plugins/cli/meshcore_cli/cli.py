"""The ``mesh-llm`` command line: a thin typer layer over NodeConfig and Node.

Heavy modules (aioquic, uvicorn, starlette, llama.cpp code) are imported only when a node
actually starts, so ``mesh-llm --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import pluggy
import typer

from meshcore.config import (
    DEFAULT_API_PORT,
    DEFAULT_CONSOLE_PORT,
    DEFAULT_DRAFT_MAX,
    ConfigError,
    NodeConfig,
    default_state_dir,
)
from meshcore.plugins import (
    PluginLoadError,
    call_contained,
    describe_plugins,
    each_plugin,
    get_plugin_manager,
)
from meshcore.registry import Registry, RegistryError, check_config, collect


class Speculation(StrEnum):
    """``--speculation``: what the host drafts with (the llamacpp backend's ``speculation``
    option; docs/backend.md)."""

    AUTO = "auto"
    DRAFT = "draft"
    NGRAM = "ngram"
    OFF = "off"


HELP = """Pool the GPUs (or CPUs) of several machines into one OpenAI-compatible LLM service.

\b
Start a mesh:   mesh-llm --model SmolLM2-135M --console
Join it:        mesh-llm --join TOKEN            (the token is printed by the first node)
Use it:         curl http://127.0.0.1:9337/v1/chat/completions ...
"""

app = typer.Typer(help=HELP, add_completion=False, no_args_is_help=False,
                  pretty_exceptions_enable=False, rich_markup_mode=None)


def _fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)


@app.callback(invoke_without_command=True)
def run(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Option(
        help="Model to serve: a catalog name (SmolLM2-135M), a .gguf path, org/repo/file.gguf, "
             "org/repo:QUANT or an https URL.")] = None,
    join: Annotated[list[str] | None, typer.Option(
        "--join", envvar="MESH_LLM_JOIN",
        help="Join token of a running node; repeat to try several. Visible in ps: prefer "
             "--join-file or $MESH_LLM_JOIN (tokens separated by spaces).")] = None,
    join_file: Annotated[Path | None, typer.Option(
        "--join-file", help="Read the join token from this file (one token a line), so it "
                            "stays out of ps.")] = None,
    join_timeout: Annotated[float, typer.Option(
        help="Give up (exit 1) when no --join address answers for this many seconds; "
             "0 = keep trying.", min=0)] = 60.0,
    bind_port: Annotated[int, typer.Option(help="UDP port for the mesh (QUIC); 0 = any.")] = 0,
    split: Annotated[bool, typer.Option(
        "--split", help="Spread layers over every worker even if the model fits the host.")
    ] = False,
    client: Annotated[bool, typer.Option(
        "--client", help="Use the mesh without serving: no model, no VRAM, never hosts.")
    ] = False,
    console: Annotated[int | None, typer.Option(
        "--console", help=f"Serve the web console (port {DEFAULT_CONSOLE_PORT} unless given); "
                          "short for --ui console.")
    ] = None,
    ui: Annotated[list[str] | None, typer.Option(
        "--ui", help="Start a registered UI plugin, NAME or NAME=PORT; repeat for several.")
    ] = None,
    port: Annotated[int, typer.Option(help="Port of the OpenAI-compatible API.")
                    ] = DEFAULT_API_PORT,
    max_vram: Annotated[float | None, typer.Option(
        help="Cap the VRAM this node offers, in GB.")] = None,
    draft: Annotated[str | None, typer.Option(help="Draft model for speculative decoding.")
                     ] = None,
    no_draft: Annotated[bool, typer.Option(
        "--no-draft", help="Use no draft model (--speculation off turns n-gram off too).")
                        ] = False,
    draft_max: Annotated[int, typer.Option(help="Most tokens drafted per step.")
                         ] = DEFAULT_DRAFT_MAX,
    speculation: Annotated[Speculation, typer.Option(
        help="Speculative decoding on the host: auto = the draft model when there is one, "
             "else n-gram lookup (draft-free, from the text so far) on split plans, where it "
             "saves network round trips; draft, ngram, or off.")] = Speculation.AUTO,
    election: Annotated[str, typer.Option(help="Election policy plugin.")] = "vram",
    election_opt: Annotated[list[str] | None, typer.Option(
        "--election-opt", help="A setting for the election, KEY=VALUE; repeatable.")] = None,
    name: Annotated[str | None, typer.Option(help="A human name for this node, announced.")
                    ] = None,
    backend: Annotated[str, typer.Option(help="Inference backend plugin.")] = "llamacpp",
    transport: Annotated[str, typer.Option(help="Transport plugin.")] = "quic",
    listen_all: Annotated[bool, typer.Option(
        "--listen-all", help="Serve the API and console on every interface, not only loopback.")
    ] = False,
    api_key: Annotated[str | None, typer.Option(
        help="Require 'Authorization: Bearer KEY' on the API. Visible in ps: prefer "
             "$MESH_LLM_API_KEY.", envvar="MESH_LLM_API_KEY")
    ] = None,
    state_dir: Annotated[Path | None, typer.Option(
        help="Where keys and logs live (default ~/.mesh-llm, or $MESH_LLM_HOME).")] = None,
    bin_dir: Annotated[Path | None, typer.Option(
        help="Use llama.cpp binaries from this directory.", envvar="MESH_LLM_BIN_DIR")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Run a mesh node (the default when no sub-command is given)."""
    if ctx.invoked_subcommand is not None:
        return
    try:
        config = NodeConfig(
            model=model, joins=(*(join or ()), *_join_file(join_file)), bind_port=bind_port,
            split=split,
            client=client, console_port=console, api_port=port, max_vram_gb=max_vram,
            draft=draft, no_draft=no_draft, draft_max=draft_max, election=election,
            backend=backend, transport=transport, listen_all=listen_all, api_key=api_key,
            state_dir=state_dir or default_state_dir(), bin_dir=bin_dir,
            options={"join_timeout_s": join_timeout, "speculation": speculation.value,
                     **_env_options()},
            uis=_pairs(ui, "--ui", "NAME=PORT", port=True),
            election_options=_pairs(election_opt, "--election-opt", "KEY=VALUE"), name=name,
        )
    except ConfigError as exc:
        _fail(str(exc))
        return
    _check_components(ctx, config)
    configure_logging(verbose)
    from meshcore_cli.runner import run_node

    raise typer.Exit(run_node(config))


NOISY = ("httpx", "httpcore", "quic", "aioquic", "uvicorn", "asyncio")  # INFO per connection


def configure_logging(verbose: bool) -> None:
    """mesh-llm's own INFO lines; third-party libraries' only from WARNING unless verbose."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")  # milliseconds: a split's load is read from them
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)


def _pairs(items: list[str] | None, flag: str, form: str, *, port: bool = False) -> Any:
    """``NAME=VALUE`` options as a dict (for --ui the value is a port, and optional)."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, eq, value = item.partition("=")
        if not key or (not eq and not port) or (port and eq and not value.isdigit()):
            raise ConfigError(f"{flag} {item!r}: expected {form}")
        out[key] = (int(value) if eq else None) if port else value
    return out


MAX_TOKEN_FILE = 64 * 1024
TOKEN_LINE = re.compile(r"[!-~]{1,4096}")  # printable ASCII, no blanks (base64url, memory:..)


def _join_file(path: Path | None) -> tuple[str, ...]:
    """The join tokens in ``--join-file``, one a line (blank lines and ``#`` comments skipped).

    The content is never echoed in an error: it is a secret."""
    if path is None:
        return ()
    hint = ("write the token a running node printed ('join with: mesh-llm --join TOKEN') "
            "into it, one token a line")
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_TOKEN_FILE + 1)
    except FileNotFoundError:
        raise ConfigError(f"--join-file {path}: no such file; {hint}") from None
    except OSError as exc:
        raise ConfigError(f"--join-file {path}: cannot read it ({exc.strerror or exc}); "
                          f"check the path and its permissions") from None
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        text = None
    lines = [line.strip() for line in (text or "").splitlines()]
    tokens = tuple(line for line in lines if line and not line.startswith("#"))
    if text is not None and not tokens:
        raise ConfigError(f"--join-file {path} is empty; {hint}")
    if (text is None or len(raw) > MAX_TOKEN_FILE
            or not all(TOKEN_LINE.fullmatch(t) for t in tokens)):
        raise ConfigError(f"--join-file {path} does not hold a join token (a token is one "
                          f"line of letters, digits, - and _); {hint}")
    return tokens


def _env_options() -> dict[str, Any]:
    """``NodeConfig.options`` from ``MESH_LLM_OPTIONS`` (a JSON object), for tests and tuning:
    e.g. ``{"quic_dead_after_s": 2, "quic_reconnect_s": 3}`` (docs/testing.md)."""
    raw = os.environ.get("MESH_LLM_OPTIONS", "").strip()
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"MESH_LLM_OPTIONS is not valid JSON ({exc}); give an object such "
                          'as {"quic_reconnect_s": 3}, or unset it') from None
    if not isinstance(options, dict):
        raise ConfigError(f"MESH_LLM_OPTIONS must be a JSON object, got {raw[:40]!r}; give "
                          'an object such as {"quic_reconnect_s": 3}, or unset it')
    return options


@app.command()
def plugins(
    ctx: typer.Context,
) -> None:
    """List the loaded plugins as JSON: name, version, hooks, and the components (transports,
    elections, backends, UIs, commands) each registers."""
    pm = _plugin_manager(ctx)
    regs, commands = _registries(ctx), _commands_by_plugin(pm)
    listed = describe_plugins(pm)
    for entry in listed:
        entry["components"] = {f"{kind}s": names for kind, reg in regs.items()
                               if (names := reg.by_plugin().get(entry["name"]))}
        if entry["name"] in commands:
            entry["components"]["commands"] = commands[entry["name"]]
    print(json.dumps(listed, indent=2))


@app.command()
def status(
    url: Annotated[str, typer.Option(
        help="The node to ask: its API address.")] = f"http://127.0.0.1:{DEFAULT_API_PORT}",
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the node's status JSON as is (one object a line with --watch).")
    ] = False,
    watch: Annotated[bool, typer.Option(
        "--watch", help="Refresh every --interval seconds until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(
        help="Seconds between refreshes with --watch.", min=0.1)] = 2.0,
    api_key: Annotated[str | None, typer.Option(
        help="The node's API key, if it was started with one; $MESH_LLM_API_KEY keeps it "
             "out of ps.", envvar="MESH_LLM_API_KEY")
    ] = None,
) -> None:
    """Show the mesh as a running node sees it: this node's role, the plan, every peer
    (role, VRAM, RTT, link, state, share), the model and draft, tunnels and API counters."""
    from meshcore_cli.status import run_status

    raise typer.Exit(run_status(url, as_json=as_json, watch=watch, interval=interval,
                                api_key=api_key))


def _commands_by_plugin(pm: pluggy.PluginManager) -> dict[str, list[str]]:
    """The sub-commands each plugin adds (each asked on its own, with a scratch app)."""
    out: dict[str, list[str]] = {}
    for impl, call in each_plugin(pm, "meshcore_register_commands"):
        scratch = typer.Typer()
        with contextlib.suppress(Exception):  # build_app already said which plugin broke
            call(app=scratch)
        names = [c.name or (c.callback.__name__ if c.callback else "?")
                 for c in scratch.registered_commands]
        names += [g.name or "?" for g in scratch.registered_groups]
        if names:
            out[impl.plugin_name] = sorted(names)
    return out


def _plugin_manager(ctx: typer.Context) -> pluggy.PluginManager:
    """The plugin manager ``main`` loaded (a fresh one when the app is invoked directly)."""
    obj = ctx.find_root().obj
    pm = obj.get("pm") if isinstance(obj, dict) else None
    return pm if isinstance(pm, pluggy.PluginManager) else get_plugin_manager()


def _registries(ctx: typer.Context) -> dict[str, Registry]:
    """The registries ``main`` collected once (collected afresh when invoked directly)."""
    obj = ctx.find_root().obj
    regs = obj.get("regs") if isinstance(obj, dict) else None
    return regs if isinstance(regs, dict) else collect(_plugin_manager(ctx))


def _check_components(ctx: typer.Context, config: NodeConfig) -> None:
    """Fail with one line, before anything starts, when a component name is unknown."""
    try:
        check_config(_registries(ctx), config)
    except RegistryError as exc:
        _fail(str(exc))


def _normalise_console(args: list[str]) -> list[str]:
    """``--console`` takes an optional port: insert the default when none follows."""
    out: list[str] = []
    for i, arg in enumerate(args):
        out.append(arg)
        if arg == "--console":
            nxt = args[i + 1] if i + 1 < len(args) else None
            if nxt is None or not nxt.isdigit():
                out.append(str(DEFAULT_CONSOLE_PORT))
    return out


def build_app(pm: pluggy.PluginManager | None = None) -> typer.Typer:
    """A fresh app: the core's options and commands plus every plugin's sub-commands."""
    if pm is None:
        pm = get_plugin_manager()
    root = typer.Typer(help=HELP, add_completion=False, no_args_is_help=False,
                       pretty_exceptions_enable=False, rich_markup_mode=None)
    root.registered_callback = app.registered_callback
    root.registered_commands = list(app.registered_commands)
    root.registered_groups = list(app.registered_groups)
    call_contained(pm, "meshcore_register_commands", app=root)
    return root


def _list_known_names(command: Any, regs: dict[str, Registry]) -> None:
    """Append the registered names to the help of --election, --backend, --transport and
    --ui, so ``--help`` says what is installed."""
    for param in getattr(command, "params", ()):
        if param.name in regs:
            param.help = f"{param.help} Installed: {', '.join(regs[param.name].names())}."


def main(argv: list[str] | None = None) -> int:
    """Entry point: one-line errors, exit code 2 for usage errors, no tracebacks."""
    args = _normalise_console(list(sys.argv[1:] if argv is None else argv))
    try:
        pm = get_plugin_manager()
        regs = collect(pm)
        command = typer.main.get_command(build_app(pm))
        _list_known_names(command, regs)
        result = command.main(args, prog_name="mesh-llm", standalone_mode=False,
                              obj={"pm": pm, "regs": regs})
    except (PluginLoadError, RegistryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except typer.Exit as exc:
        return int(exc.exit_code)
    except typer.Abort:
        return 130
    except typer.TyperException as exc:  # click-style usage errors (exit code 2)
        code = int(getattr(exc, "exit_code", 2))
        hint = " (see mesh-llm --help)" if code == 2 else ""
        print(f"error: {exc.format_message()}{hint}", file=sys.stderr)
        return code
    return result if isinstance(result, int) else 0

