"""``--join`` to an address where no node answers: the node says what it does, at the interval
it says, and gives up with exit code 1 and one clear line after ``--join-timeout`` (0 keeps
trying). Real ``mesh-llm`` processes, fake backend."""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_client import quic_missing

pytestmark = pytest.mark.skipif(quic_missing() is not None, reason=str(quic_missing()))


def dead_token() -> tuple[str, int]:
    """A well-formed token whose address has no node: a UDP port bound, then released."""
    from meshcore_transport_quic.token import JoinToken

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = JoinToken(secrets.token_bytes(32), secrets.token_bytes(32), port, ("127.0.0.1",))
    return token.encode(), port


def start(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "MESH_LLM_HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "meshcore_cli", "--backend", "fake",
                             "--model", "fake-model", "--port", "0", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_join_to_a_dead_address_gives_up_with_one_clear_line(tmp_path: Path) -> None:
    token, port = dead_token()
    proc = start(tmp_path, "--join", token, "--join-timeout", "6")
    try:
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 1, out
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    assert f"could not join the mesh at 127.0.0.1:{port} in 6 s" in errors[0]
    assert "--join-timeout" in errors[0]
    assert re.search(r"trying again every \d+ s, giving up in", out), out


def test_join_timeout_zero_keeps_trying(tmp_path: Path) -> None:
    token, _ = dead_token()
    proc = start(tmp_path, "--join", token, "--join-timeout", "0")
    try:
        time.sleep(12)  # past the 6 s the other test gives up after; no upper bound asserted
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out
    assert "until it answers" in out and "Traceback" not in out, out
