"""Children: stopped on every exit path, killed with mesh-llm (PDEATHSIG), logs tailed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import psutil
import pytest
from meshcore_backend_llamacpp.process import (
    Child,
    ChildFailed,
    slots_busy,
    supervised,
    wait_healthy,
)

pytestmark = pytest.mark.anyio


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_child_runs_in_its_own_group_and_is_stopped_on_exit(tmp_path: Path) -> None:
    async with supervised("sleeper", ["sleep", "60"], tmp_path) as child:
        assert child.pid is not None and child.alive
        assert os.getpgid(child.pid) == child.pid
        pid = child.pid
    assert gone(pid)


async def test_child_is_stopped_when_the_block_is_cancelled(tmp_path: Path) -> None:
    pids: list[int] = []
    with anyio.move_on_after(0.5):
        async with supervised("sleeper", ["sleep", "60"], tmp_path) as child:
            assert child.pid is not None
            pids.append(child.pid)
            await anyio.sleep_forever()
    assert pids and gone(pids[0])


async def test_failure_quotes_the_log_tail(tmp_path: Path) -> None:
    child = Child("talker", ["sh", "-c", "echo broken-$((40 + 2)); exit 3"], tmp_path)
    await child.start()
    with pytest.raises(ChildFailed, match=r"(?s)exited with code 3.*broken-42"):
        await wait_healthy(child, 9, timeout=10)
    assert "broken-42" in (tmp_path / "talker.log").read_text()


async def test_a_restart_quotes_its_own_run_and_names_the_signal(tmp_path: Path) -> None:
    """The log is appended across restarts: a failure quotes this run's lines only, and a
    death by signal says which (a SIGSEGV showed as "exited with code -11" amid the lines of
    five earlier runs)."""
    first = Child("llama-server", ["sh", "-c", "echo error: first-run-only; exit 1"], tmp_path)
    await first.start()
    with pytest.raises(ChildFailed):
        await wait_healthy(first, 9, timeout=10)
    second = Child("llama-server", ["sh", "-c", "echo second-run; kill -SEGV $$"], tmp_path)
    await second.start()
    with pytest.raises(ChildFailed) as caught:
        await wait_healthy(second, 9, timeout=10)
    text = str(caught.value)
    assert "was killed by SIGSEGV while loading" in text.partition("\n")[0]
    assert "second-run" in text and "first-run-only" not in text
    assert "first-run-only" in (tmp_path / "llama-server.log").read_text()


GDB_TAIL = """\
llama_model_load: error loading model: tensor 'blk.3.attn_q.weight' is out of the file bounds
llama_model_load_from_file_impl: failed to load model
[New LWP 4242]
[Thread debugging using libthread_db enabled]
Using host libthread_db library "/lib/x86_64-linux-gnu/libthread_db.so.1".
0x00007f1c2b4e3c17 in wait4 () from /lib/x86_64-linux-gnu/libc.so.6
#0  0x00007f1c2b4e3c17 in wait4 () from /lib/x86_64-linux-gnu/libc.so.6
#1  0x000055d0c1a2b3c4 in ggml_print_backtrace ()
#2  0x000055d0c1a2b5e6 in ggml_abort ()
syscall () at ../sysdeps/unix/sysv/linux/x86_64/syscall.S:38
38\t../sysdeps/unix/sysv/linux/x86_64/syscall.S: No such file or directory.
38\tin ../sysdeps/unix/sysv/linux/x86_64/syscall.S
360\t../csu/libc-start.c: No such file or directory.
[Inferior 1 (process 4241) detached]
"""


async def test_the_error_line_is_llama_cpps_not_gdbs(tmp_path: Path) -> None:
    """A crashing llama.cpp prints gdb's backtrace after its message: the failure's first line
    must name llama.cpp's error, and the quoted tail leaves the frames out."""
    script = tmp_path / "crash.sh"
    script.write_text(f"cat <<'EOF'\n{GDB_TAIL}EOF\nexit 134\n")
    child = Child("llama-server", ["sh", str(script)], tmp_path)
    await child.start()
    with pytest.raises(ChildFailed) as caught:
        await wait_healthy(child, 9, timeout=10)
    first, _, rest = str(caught.value).partition("\n")
    assert "exited with code 134" in first
    assert first.endswith("error loading model: tensor 'blk.3.attn_q.weight' is out of the "
                          f"file bounds; last lines of {tmp_path / 'llama-server.log'}:")
    assert "failed to load model" in rest and "#0" not in rest and "[New LWP" not in rest
    assert "sysdeps" not in rest and "libc-start" not in rest, rest


ENV_PROBE = ["sh", "-c", "echo backtrace=${GGML_NO_BACKTRACE-unset} cache=${LLAMA_CACHE-unset}"]


@pytest.mark.parametrize(("asked", "expected"), [(None, "1"), ("0", "1"), ("1", "unset")])
async def test_children_skip_llama_cpps_gdb_backtrace_unless_asked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, asked: str | None,
        expected: str) -> None:
    """llama.cpp attaches gdb on abort (~0.5 s before it exits; the host's llama-server aborts
    whenever a worker goes away): children get GGML_NO_BACKTRACE=1, MESH_LLM_BACKTRACE=1
    keeps the backtrace; an env given for the child (the worker's LLAMA_CACHE) is kept."""
    monkeypatch.delenv("GGML_NO_BACKTRACE", raising=False)
    if asked is None:
        monkeypatch.delenv("MESH_LLM_BACKTRACE", raising=False)
    else:
        monkeypatch.setenv("MESH_LLM_BACKTRACE", asked)
    for env, cache in ((None, "unset"), ({**os.environ, "LLAMA_CACHE": "/c"}, "/c")):
        async with supervised("probe", ENV_PROBE, tmp_path, env) as child:
            assert await child.wait() == 0
        last = (tmp_path / "probe.log").read_text().splitlines()[-1]
        assert last == f"backtrace={expected} cache={cache}", last


async def test_missing_executable_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ChildFailed, match="could not start: /nonexistent/llama-server"):
        async with supervised("x", ["/nonexistent/llama-server"], tmp_path):
            pass


PARENT = """
import sys, anyio
from pathlib import Path
from meshcore_backend_llamacpp.process import supervised

async def main():
    async with supervised("sleeper", ["sleep", "60"], Path(sys.argv[1])) as child:
        print(child.pid, flush=True)
        await anyio.sleep_forever()

anyio.run(main)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_sigkill_of_the_parent_kills_the_child(tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        assert not gone(pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 5
        while not gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gone(pid), "the child outlived its SIGKILLed parent"
    finally:
        parent.kill()
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()


@pytest.mark.parametrize(("body", "busy"), [
    (b'[{"id": 0, "is_processing": false}, {"id": 1, "is_processing": true}]', True),
    (b'[{"id": 0, "is_processing": false}]', False),
    (b'{"error": "slots endpoint disabled"}', False),
    (b"not json", False),
])
async def test_slots_busy_reads_llama_servers_slots(body: bytes, busy: bool) -> None:
    """The hand-over waits on this before stopping the old llama-server."""
    import asyncio

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert (await reader.readline()).startswith(b"GET /slots ")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        assert await slots_busy(port) is busy
    assert await slots_busy(port) is False  # nobody listening any more


async def test_status_shows_running_children_only(tmp_path: Path) -> None:
    """``/mesh/status`` kept a stopped llama-server's pid and argv after a hand-over."""
    from meshcore_backend_llamacpp.backend import child_status

    async with supervised("sleeper", ["sleep", "60"], tmp_path) as child:
        shown = child_status(child, 1234)
        assert shown is not None and shown["pid"] == child.pid and shown["alive"]
    assert not child.alive and child_status(child, 1234) is None
    assert child_status(None) is None
