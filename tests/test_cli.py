"""The ``mesh-llm`` command line: every flag, every usage error, real processes and signals."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from meshcore_cli import cli, runner
from meshcore_testing.pytest_plugin import MeshProcess

from meshcore.config import NodeConfig

FAKE = ["--backend", "fake", "--transport", "memory"]


@pytest.fixture
def parse(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
          capsys: pytest.CaptureFixture[str]) -> Callable[..., NodeConfig]:
    """Run the CLI in-process with ``run_node`` replaced; returns the NodeConfig it built."""
    monkeypatch.setenv("MESH_LLM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MESH_LLM_API_KEY", raising=False)
    seen: list[NodeConfig] = []

    def fake_run_node(config: NodeConfig) -> int:
        seen.append(config)
        return 0

    monkeypatch.setattr(runner, "run_node", fake_run_node)

    def run(*args: str) -> NodeConfig:
        code = cli.main(list(args))
        err = capsys.readouterr().err
        assert code == 0, err
        assert len(seen) == 1, "run_node was not called exactly once"
        return seen.pop()

    return run


@pytest.fixture
def fails(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
          capsys: pytest.CaptureFixture[str]) -> Callable[..., str]:
    """Run the CLI in-process, expect a usage error; returns the single stderr line."""
    monkeypatch.setenv("MESH_LLM_HOME", str(tmp_path / "home"))

    def must_not_run(config: NodeConfig) -> int:
        raise AssertionError(f"run_node called despite a usage error: {config}")

    monkeypatch.setattr(runner, "run_node", must_not_run)

    def run(*args: str) -> str:
        code = cli.main(list(args))
        err = capsys.readouterr().err
        assert code == 2, err
        assert "Traceback" not in err
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith("error: "), err
        return lines[0]

    return run


# ---------------------------------------------------------------- parsing (in-process)


def test_defaults(parse: Callable[..., NodeConfig], tmp_path: Path) -> None:
    cfg = parse("--model", "SmolLM2-135M")
    assert cfg.model == "SmolLM2-135M"
    assert (cfg.joins, cfg.bind_port, cfg.split, cfg.client) == ((), 0, False, False)
    assert (cfg.console_port, cfg.api_port, cfg.max_vram_gb) == (None, 9337, None)
    assert (cfg.draft, cfg.no_draft, cfg.draft_max) == (None, False, 8)
    assert cfg.options["speculation"] == "auto"
    assert (cfg.election, cfg.backend, cfg.transport) == ("vram", "llamacpp", "quic")
    assert (cfg.listen_all, cfg.api_key, cfg.bind_host) == (False, None, "127.0.0.1")
    assert cfg.state_dir == tmp_path / "home"


def test_every_flag(parse: Callable[..., NodeConfig], tmp_path: Path) -> None:
    cfg = parse("--model", "org/repo/m.gguf", "--join", "T1", "--join", "T2",
                "--bind-port", "7000", "--split", "--console", "4000", "--port", "0",
                "--max-vram", "2.5", "--draft", "d.gguf", "--draft-max", "4",
                "--speculation", "ngram", "--election", "vram", *FAKE, "--listen-all",
                "--api-key", "sekret",
                "--state-dir", str(tmp_path / "st"), "--bin-dir", str(tmp_path / "bin"))
    assert cfg.model == "org/repo/m.gguf"
    assert cfg.joins == ("T1", "T2")
    assert (cfg.bind_port, cfg.split, cfg.console_port, cfg.api_port) == (7000, True, 4000, 0)
    assert cfg.max_vram_gb == 2.5 and cfg.max_vram_bytes == int(2.5 * 1024**3)
    assert (cfg.draft, cfg.no_draft, cfg.draft_max) == ("d.gguf", False, 4)
    assert cfg.options["speculation"] == "ngram"
    assert (cfg.election, cfg.backend, cfg.transport) == ("vram", "fake", "memory")
    assert (cfg.listen_all, cfg.bind_host, cfg.api_key) == (True, "0.0.0.0", "sekret")
    assert (cfg.state_dir, cfg.bin_dir) == (tmp_path / "st", tmp_path / "bin")


@pytest.mark.parametrize("args", [
    ["--model", "m", "--console"],  # last argument
    ["--console", "--model", "m"],  # followed by another option
])
def test_console_without_port_uses_3131(parse: Callable[..., NodeConfig],
                                        args: list[str]) -> None:
    assert parse(*args).console_port == 3131


def test_console_with_port(parse: Callable[..., NodeConfig]) -> None:
    assert parse("--model", "m", "--console", "4001").console_port == 4001
    assert parse("--model", "m", "--console=4002").console_port == 4002


def test_no_draft(parse: Callable[..., NodeConfig]) -> None:
    cfg = parse("--model", "m", "--no-draft")
    assert cfg.no_draft and cfg.draft is None


def test_client_joins_without_model(parse: Callable[..., NodeConfig]) -> None:
    cfg = parse("--client", "--join", "TOKEN", *FAKE)
    assert cfg.client and cfg.model is None and cfg.joins == ("TOKEN",)


def test_join_alone_needs_no_model(parse: Callable[..., NodeConfig]) -> None:
    cfg = parse("--join", "TOKEN")
    assert cfg.model is None and not cfg.client


def test_api_key_from_env(parse: Callable[..., NodeConfig],
                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_LLM_API_KEY", "from-env")
    assert parse("--model", "m").api_key == "from-env"


def test_join_from_file_and_env(parse: Callable[..., NodeConfig], tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    token_file = tmp_path / "join"
    token_file.write_text("\n  # the mesh at home\n  AbC-12_x  \n\nmemory:1f\n")
    assert parse("--join-file", str(token_file)).joins == ("AbC-12_x", "memory:1f")
    assert parse("--join", "T1", "--join-file", str(token_file)).joins == (
        "T1", "AbC-12_x", "memory:1f")
    monkeypatch.setenv("MESH_LLM_JOIN", "E1  E2")
    assert parse().joins == ("E1", "E2")
    assert parse("--join", "T1").joins == ("T1",)  # the flag wins over the environment


@pytest.mark.parametrize(("content", "expected"), [
    (None, "no such file; write the token a running node printed"),
    ("", "is empty; write the token"),
    ("  \n# only a comment\n", "is empty"),
    ("secret-token and more words\n", "does not hold a join token"),
    (b"\xff\xfe binary \x00", "does not hold a join token"),
    ("x" * 5000, "does not hold a join token"),
    ("dir", "cannot read it (Is a directory)"),
], ids=["missing", "empty", "blank", "words", "binary", "too-long", "directory"])
def test_join_file_errors_name_the_file(fails: Callable[..., str], tmp_path: Path,
                                        content: str | bytes | None, expected: str) -> None:
    path = tmp_path / "token file"
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    line = fails("--join-file", str(path), *FAKE)
    assert line.startswith(f"error: --join-file {path}"), line
    assert expected in line, line
    assert "secret-token" not in line and "binary" not in line, "the content is a secret"


@pytest.mark.parametrize(("args", "expected"), [
    (["--client", "--join", "T", "--model", "m"], "--client runs no model"),
    ([], "--model is required"),
    (["--client"], "--client needs --join"),
    (["--model", "m", "--draft", "d.gguf", "--no-draft"], "--draft and --no-draft"),
    (["--model", "m", "--port", "70000"], "--port must be a port number 0-65535, got 70000"),
    (["--model", "m", "--port", "abc"], "'--port'"),
    (["--model", "m", "--bind-port", "-1"], "--bind-port must be a port number"),
    (["--model", "m", "--console", "99999"], "--console must be a port number"),
    (["--model", "m", "--draft-max", "0"], "--draft-max must be at least 1"),
    (["--model", "m", "--speculation", "eagle"], "'eagle' is not one of 'auto', 'draft'"),
    (["--model", "m", "--max-vram", "-1"], "--max-vram must be >= 0"),
    (["--model", "m", "--max-vram", "lots"], "'--max-vram'"),
    (["--model", "m", "--election", "nope"], "unknown election 'nope' (from --election); "
                                             "known: * vram"),
    (["--model", "m", "--backend", "nope"], "unknown backend 'nope' (from --backend); "
                                            "known: * fake * llamacpp"),
    (["--model", "m", "--transport", "nope"], "known: * memory * quic"),
    (["--model", "m", "--bogus"], "No such option: --bogus"),
    (["--model"], "'--model'"),
])
def test_usage_errors(fails: Callable[..., str], args: list[str], expected: str) -> None:
    """``expected`` must appear in the error line; `` * `` stands for anything."""
    pattern = ".*".join(re.escape(part) for part in expected.split(" * "))
    line = fails(*args)
    assert re.search(pattern, line), line


def test_console_blocked_is_a_usage_error(fails: Callable[..., str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHCORE_DISABLE_PLUGINS", "console")
    line = fails("--model", "m", "--console")
    assert "unknown ui 'console' (from --console)" in line


def test_help_lists_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--join", "--bind-port", "--split", "--client", "--console",
                 "--port", "--max-vram", "--draft", "--no-draft", "--draft-max", "--election",
                 "--backend", "--transport", "--listen-all", "--api-key", "plugins"):
        assert flag in out, f"{flag} missing from --help"


def test_help_lists_download(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    if "download" not in out:
        pytest.skip("the download sub-command is not implemented yet (issue: models)")
    assert cli.main(["download", "--help"]) == 0


def test_plugins_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plugins"]) == 0
    listed = json.loads(capsys.readouterr().out)
    by_name = {p["name"]: p for p in listed}
    assert {"quic", "vram", "llamacpp", "console", "testing"} <= set(by_name)
    assert "meshcore_register_elections" in by_name["vram"]["hooks"]
    assert all(set(p) == {"name", "version", "hooks", "components"} for p in listed)
    assert by_name["vram"]["components"] == {"elections": ["vram"]}
    assert by_name["llamacpp"]["components"] == {
        "backends": ["llamacpp"], "commands": ["bundle", "download", "models"]}
    assert by_name["console"]["components"] == {"uis": ["console"]}
    assert all(p["version"] == "0.1.0" for p in listed)
    assert {"meshcore_register_backends", "meshcore_register_transports"} <= set(
        by_name["testing"]["hooks"])


def test_register_commands_hook_adds_a_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    import typer

    from meshcore import hookimpl
    from meshcore.plugins import get_plugin_manager

    class Hello:
        @hookimpl
        def meshcore_register_commands(self, app: typer.Typer) -> None:
            @app.command()
            def hello() -> None:
                """Say hello."""
                print("hello from a plugin")

    pm = get_plugin_manager()
    pm.register(Hello(), name="hello")
    command = typer.main.get_command(cli.build_app(pm))
    command.main(["hello"], prog_name="mesh-llm", standalone_mode=False)
    assert capsys.readouterr().out == "hello from a plugin\n"
    # the shared app is not changed: a fresh build has no such command
    assert "hello" not in typer.main.get_command(cli.build_app()).commands  # type: ignore[attr-defined]


# ---------------------------------------------------------------- real processes


def mesh_llm(*args: str, home: Path, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "MESH_LLM_HOME": str(home), **(env or {})}
    return subprocess.run([sys.executable, "-m", "meshcore_cli", *args], env=full,
                          capture_output=True, text=True, timeout=120)


def test_subprocess_usage_error_is_one_line(tmp_path: Path) -> None:
    done = mesh_llm("--client", "--join", "T", "--model", "m", home=tmp_path)
    assert done.returncode == 2
    assert done.stderr == ("error: --client runs no model: drop --model, "
                           "or drop --client to serve it\n")
    done = mesh_llm("--model", "m", "--election", "nope", home=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("error: unknown election 'nope'")
    assert done.stderr.count("\n") == 1


def test_disabling_a_plugin_removes_it_from_plugins(tmp_path: Path) -> None:
    names = {p["name"] for p in json.loads(mesh_llm("plugins", home=tmp_path).stdout)}
    assert "console" in names
    done = mesh_llm("plugins", home=tmp_path, env={"MESHCORE_DISABLE_PLUGINS": "console"})
    assert done.returncode == 0, done.stderr
    names = {p["name"] for p in json.loads(done.stdout)}
    assert "console" not in names and "vram" in names


@pytest.mark.parametrize(("sig", "args"), [
    (signal.SIGINT, FAKE),
    (signal.SIGTERM, FAKE),
    (signal.SIGINT, ["--backend", "fake", "--console", "0"]),  # default QUIC transport, console
], ids=["sigint", "sigterm", "sigint-quic-console"])
def test_signal_stops_cleanly(mesh_process: Callable[..., MeshProcess], sig: int,
                              args: list[str]) -> None:
    node = mesh_process("--model", "x", *args)
    wait_until_serving(node)
    assert node.stop(sig) == 0
    log = node.log()
    assert "Traceback" not in log and "error" not in log.lower(), log
    assert f"{signal.Signals(sig).name} received: stopping" in log


def argv_of_tree(pid: int) -> str:
    """The command lines of a process and all its children, as ``ps`` shows them."""
    import psutil

    root = psutil.Process(pid)
    return "\n".join(" ".join(p.cmdline()) for p in [root, *root.children(recursive=True)])


def mesh_peers(node: MeshProcess, key: str) -> set[str]:
    r = httpx.get(f"http://127.0.0.1:{node.api_port}/mesh/status",
                  headers={"authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return {p["id"] for p in r.json()["peers"]}


def test_secrets_from_file_and_env_stay_out_of_argv(
        mesh_process: Callable[..., MeshProcess], tmp_path: Path) -> None:
    """A token from --join-file or $MESH_LLM_JOIN and a key from $MESH_LLM_API_KEY: the nodes
    join and check the key, and neither secret is in any process's command line."""
    fake_quic = ["--model", "x", "--backend", "fake"]  # the real QUIC transport: real tokens
    a = mesh_process(*fake_quic, env={"MESH_LLM_API_KEY": "key-of-a-0001"})
    assert a.token is not None
    token_file = tmp_path / "join-token"
    token_file.write_text(f"\n  {a.token}  \n")
    b = mesh_process(*fake_quic, "--join-file", str(token_file),
                     env={"MESH_LLM_API_KEY": "key-of-b-0002"})
    c = mesh_process(*fake_quic, env={"MESH_LLM_JOIN": a.token,
                                      "MESH_LLM_API_KEY": "key-of-c-0003"})
    for node in (a, b, c):
        shown = argv_of_tree(node.proc.pid)
        assert a.token not in shown and "key-of-" not in shown, shown
    for _ in range(600):
        if len(mesh_peers(a, "key-of-a-0001")) == 2:
            break
        time.sleep(0.05)
    assert len(mesh_peers(a, "key-of-a-0001")) == 2, a.log()
    assert len(mesh_peers(b, "key-of-b-0002")) == 2 and len(mesh_peers(c, "key-of-c-0003")) == 2
    for node in (b, c):
        for wrong in ({}, {"authorization": "Bearer key-of-a-0001"}):
            r = httpx.get(f"http://127.0.0.1:{node.api_port}/mesh/status", headers=wrong)
            assert r.status_code == 401, (wrong, r.text)
    # `mesh-llm status` takes the key from the environment too
    url = f"http://127.0.0.1:{b.api_port}"
    done = mesh_llm("status", "--url", url, "--json", home=tmp_path / "s",
                    env={"MESH_LLM_API_KEY": "key-of-b-0002"})
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["peers"]) == 2
    done = mesh_llm("status", "--url", url, home=tmp_path / "s",
                    env={"MESH_LLM_API_KEY": "wrong-key"})
    assert done.returncode != 0 and "rejected the API key" in done.stderr, done.stderr


def wait_until_serving(node: MeshProcess) -> None:
    for _ in range(400):
        try:
            if node.get("/health").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"node never became healthy:\n{node.log()}")


def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = mesh_llm("--model", "x", *FAKE, "--port", str(port), home=tmp_path)
    assert done.returncode == 1
    assert done.stderr == (f"error: cannot listen on 127.0.0.1:{port}: Address already in use;"
                           f" pick another port\n")


def test_help_imports_no_heavy_module(tmp_path: Path) -> None:
    """``mesh-llm --help`` must stay light: no aioquic, uvicorn, starlette, llama.cpp code."""
    probe = (
        "import sys\n"
        "from meshcore_cli import cli\n"
        "assert cli.main(['--help']) == 0\n"
        "print('MODULES', ' '.join(sorted(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    modules = set(done.stdout.split("MODULES", 1)[1].split())
    heavy = {"aioquic", "uvicorn", "starlette", "httpx", "cryptography", "gguf",
             "huggingface_hub", "meshcore.node", "meshcore.api",
             "meshcore_backend_llamacpp.backend", "meshcore_backend_llamacpp.build",
             "meshcore_transport_quic.transport", "meshcore_console.app"}
    loaded = {m for m in modules if m in heavy or m.split(".")[0] in heavy}
    assert not loaded, f"--help imported {sorted(loaded)}"
    # the plugins' light __init__ modules are imported: that is how entry points load
    assert "meshcore_election_vram" in modules


def test_errors_inside_task_groups_become_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from meshcore.config import ConfigError
    from meshcore.registry import RegistryError

    nested = BaseExceptionGroup("outer", [ExceptionGroup("inner", [
        OSError(98, "cannot listen on 127.0.0.1:1: Address already in use; pick another port")
    ])])
    leaves = runner.leaf_exceptions(nested)
    assert [type(e) for e in leaves] == [OSError]
    assert runner.report_error(leaves[0]) == 1
    assert capsys.readouterr().err == ("error: cannot listen on 127.0.0.1:1: Address already "
                                       "in use; pick another port\n")
    assert runner.report_error(ConfigError("--port is bad")) == 2
    assert runner.report_error(RegistryError("unknown backend 'x'")) == 2
    assert runner.report_error(FileNotFoundError(2, "No such file", "/m.gguf")) == 1
    assert runner.report_error(ZeroDivisionError("boom")) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: --port is bad", "error: unknown backend 'x'",
                   "error: [Errno 2] No such file: '/m.gguf'",
                   "error: ZeroDivisionError: boom (run with --verbose for the traceback)"]


def test_third_party_info_logs_are_quiet_unless_verbose() -> None:
    try:
        cli.configure_logging(verbose=False)
        assert not logging.getLogger("httpx").isEnabledFor(logging.INFO)
        assert not logging.getLogger("quic").isEnabledFor(logging.INFO)  # aioquic's logger
        cli.configure_logging(verbose=True)
        assert logging.getLogger("httpx").level == logging.NOTSET  # the root level rules
    finally:
        for name in cli.NOISY:
            logging.getLogger(name).setLevel(logging.NOTSET)
