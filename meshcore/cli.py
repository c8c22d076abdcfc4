"""The ``mesh-llm`` command line: a thin typer layer over NodeConfig and Node.

Heavy modules (aioquic, uvicorn, starlette, llama.cpp code) are imported only when a node
actually starts, so ``mesh-llm --help`` stays fast.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import click
import typer

from meshcore.config import (
    DEFAULT_API_PORT,
    DEFAULT_CONSOLE_PORT,
    DEFAULT_DRAFT_MAX,
    ConfigError,
    NodeConfig,
    default_state_dir,
)

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
        "--join", help="Join token of a running node; repeat to try several.")] = None,
    bind_port: Annotated[int, typer.Option(help="UDP port for the mesh (QUIC); 0 = any.")] = 0,
    split: Annotated[bool, typer.Option(
        "--split", help="Spread layers over every worker even if the model fits the host.")
    ] = False,
    client: Annotated[bool, typer.Option(
        "--client", help="Use the mesh without serving: no model, no VRAM, never hosts.")
    ] = False,
    console: Annotated[int | None, typer.Option(
        "--console", help=f"Serve the web console (port {DEFAULT_CONSOLE_PORT} unless given).")
    ] = None,
    port: Annotated[int, typer.Option(help="Port of the OpenAI-compatible API.")
                    ] = DEFAULT_API_PORT,
    max_vram: Annotated[float | None, typer.Option(
        help="Cap the VRAM this node offers, in GB.")] = None,
    draft: Annotated[str | None, typer.Option(help="Draft model for speculative decoding.")
                     ] = None,
    no_draft: Annotated[bool, typer.Option("--no-draft", help="Disable speculative decoding.")
                        ] = False,
    draft_max: Annotated[int, typer.Option(help="Most tokens drafted per step.")
                         ] = DEFAULT_DRAFT_MAX,
    election: Annotated[str, typer.Option(help="Election policy plugin.")] = "vram",
    backend: Annotated[str, typer.Option(help="Inference backend plugin.")] = "llamacpp",
    transport: Annotated[str, typer.Option(help="Transport plugin.")] = "quic",
    listen_all: Annotated[bool, typer.Option(
        "--listen-all", help="Serve the API and console on every interface, not only loopback.")
    ] = False,
    api_key: Annotated[str | None, typer.Option(
        help="Require 'Authorization: Bearer KEY' on the API.", envvar="MESH_LLM_API_KEY")
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
            model=model, joins=tuple(join or ()), bind_port=bind_port, split=split,
            client=client, console_port=console, api_port=port, max_vram_gb=max_vram,
            draft=draft, no_draft=no_draft, draft_max=draft_max, election=election,
            backend=backend, transport=transport, listen_all=listen_all, api_key=api_key,
            state_dir=state_dir or default_state_dir(), bin_dir=bin_dir,
        )
    except ConfigError as exc:
        _fail(str(exc))
        return
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from meshcore.runner import run_node

    raise typer.Exit(run_node(config))


@app.command()
def plugins(
    all_: Annotated[bool, typer.Option("--all", help="Include the core's built-in plugins.")
                    ] = False,
) -> None:
    """List the loaded plugins as JSON (name, version, hooks)."""
    from meshcore.plugins import describe_plugins, get_plugin_manager

    print(json.dumps(describe_plugins(get_plugin_manager(), include_all=all_), indent=2))


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


def build_app() -> typer.Typer:
    """The app with every plugin's sub-commands added."""
    from meshcore.plugins import get_plugin_manager

    pm = get_plugin_manager()
    pm.hook.meshcore_register_commands(app=app)
    return app


def main(argv: list[str] | None = None) -> Any:
    """Entry point: one-line errors, exit code 2 for usage errors, no tracebacks."""
    args = _normalise_console(list(sys.argv[1:] if argv is None else argv))
    command = typer.main.get_command(build_app())
    try:
        return command.main(args, prog_name="mesh-llm", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        print(f"error: {exc.format_message()}", file=sys.stderr)
        if isinstance(exc, click.UsageError):
            print("Try 'mesh-llm --help' for help.", file=sys.stderr)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
