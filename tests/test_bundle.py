"""``mesh-llm bundle``: build the archive, install it into a fresh venv with no package index,
run the installed ``mesh-llm`` (and, with real llama.cpp, a solo node on the bundled binaries).

Slow (about two minutes: wheels are built and fetched, then installed), so the bundle is built
and installed once for the module.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from meshcore_backend_llamacpp.bundle import pinned_requirements

pytestmark = pytest.mark.timeout(1200)
PLUGINS = {"quic", "vram", "llamacpp", "console"}


@dataclass(frozen=True)
class Installed:
    top: Path  # the unpacked bundle
    prefix: Path  # where install.sh put it

    @property
    def launcher(self) -> Path:
        return self.prefix / "mesh-llm"


def offline_env(**extra: str) -> dict[str, str]:
    """The environment without any package index: pip config and find-links dropped."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PIP_", "UV_", "PYTEST", "VIRTUAL_ENV", "MESH_LLM_BIN_DIR"))}
    env |= {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1",
            "PIP_INDEX_URL": "http://127.0.0.1:9/simple"}
    return env | extra


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    tmp = tmp_path_factory.mktemp("bundle")
    made = subprocess.run([sys.executable, "-m", "meshcore_cli", "bundle", str(tmp / "mesh")],
                          capture_output=True, text=True, timeout=900)
    assert made.returncode == 0, made.stderr
    archive = tmp / "mesh.tar.gz"
    assert f"{archive} (" in made.stdout
    with tarfile.open(archive) as tar:
        tar.extractall(tmp / "unpacked", filter="data")
    (top,) = (tmp / "unpacked").iterdir()
    done = subprocess.run([str(top / "install.sh"), str(tmp / "prefix")], capture_output=True,
                          text=True, timeout=900, env=offline_env(PYTHON=sys.executable))
    assert done.returncode == 0, done.stdout + done.stderr
    return Installed(top, tmp / "prefix")


def test_pinned_requirements_follow_the_running_environment() -> None:
    pins = pinned_requirements("mesh-llm", {"meshcore-backend-llamacpp"})
    names = {p.split("==")[0] for p in pins}
    assert {"huggingface-hub", "typer", "anyio", "aioquic", "fnv-c"} <= names
    assert "pytest" not in names and "mesh-llm" not in names  # no dev deps, no root
    assert "meshcore-backend-llamacpp" not in names
    assert all(re.fullmatch(r"[a-z0-9-]+==\S+", p) for p in pins)


def test_bundle_holds_wheels_binaries_and_installer(installed: Installed) -> None:
    wheels = {p.name.split("-")[0] for p in (installed.top / "wheels").glob("*.whl")}
    assert {"mesh_llm", "meshcore_transport_quic", "meshcore_election_vram",
            "meshcore_backend_llamacpp", "meshcore_console", "huggingface_hub"} <= wheels
    from meshcore_backend_llamacpp.build import cached_bin_dir

    cached = cached_bin_dir()
    if cached is not None:
        for name in ("llama-server", "ggml-rpc-server"):
            bundled = installed.top / "bin" / name
            assert bundled.read_bytes() == (cached / name).read_bytes()
            assert os.access(installed.prefix / "bin" / name, os.X_OK)


def test_installed_bundle_runs_without_the_source_tree(installed: Installed) -> None:
    helped = subprocess.run([str(installed.launcher), "--help"], capture_output=True, text=True,
                            timeout=60, env=offline_env())
    assert helped.returncode == 0, helped.stderr
    assert "Pool the GPUs" in helped.stdout and "bundle" in helped.stdout
    where = subprocess.run([str(installed.prefix / "venv" / "bin" / "python"), "-c",
                            "import meshcore, meshcore_backend_llamacpp.catalog as c; "
                            "print(meshcore.__file__); "
                            "print(len(c.load().entries))"],
                           capture_output=True, text=True, timeout=60, cwd="/")
    path, count = where.stdout.split()
    assert Path(path).is_relative_to(installed.prefix) and int(count) > 20  # catalog.json shipped
    listed = subprocess.run([str(installed.launcher), "plugins"], capture_output=True,
                            text=True, timeout=60, env=offline_env())
    assert set(re.findall(r'"name": "(\w+)"', listed.stdout)) >= PLUGINS, listed.stdout


@contextlib.contextmanager
def bundled_node(installed: Installed, model: Path, home: Path) -> Iterator[str]:
    """A solo node of the installed bundle on the bundled binaries; yields its API URL."""
    env = offline_env(MESH_LLM_HOME=str(home), MESH_LLM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([str(installed.prefix / "venv" / "bin" / "mesh-llm"), "--model",
                             str(model), "--port", "0", "--bin-dir", str(installed.top / "bin")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    lines: list[str] = []
    port: list[int] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if m := re.search(r"API\s+http://[\d.]+:(\d+)/v1", line):
                port.append(int(m[1]))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not port:
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines[-30:])
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port[0]}"
    finally:
        children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)] \
            if proc.poll() is None else []
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for pid in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
        reader.join(5)
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.mark.real
def test_bundled_solo_node_answers_on_the_bundled_binaries(installed: Installed,
                                                           tmp_path: Path) -> None:
    if not (installed.top / "bin" / "llama-server").is_file():
        pytest.skip("no llama.cpp build was cached, so the bundle holds no binaries")
    from meshcore_backend_llamacpp.models import smollm2_path

    model = smollm2_path()
    with bundled_node(installed, model, tmp_path / "home") as url:
        deadline = time.monotonic() + 180
        reply = None
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                reply = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
                    "model": "default", "max_tokens": 8, "temperature": 0,
                    "messages": [{"role": "user", "content": "The capital of France is"}]})
                if reply.status_code == 200:
                    break
            time.sleep(0.5)
        assert reply is not None and reply.status_code == 200, reply and reply.text
        assert reply.json()["choices"][0]["message"]["content"].strip()
        status = httpx.get(f"{url}/mesh/status", timeout=10).json()
        pid = status["backend"]["llama_server"]["pid"]
        exe = Path(os.readlink(f"/proc/{pid}/exe"))
        digest = hashlib.sha256(exe.read_bytes()).hexdigest()
        bundled = hashlib.sha256((installed.top / "bin" / "llama-server").read_bytes())
        assert exe.parent == installed.top / "bin" and digest == bundled.hexdigest()


STUB_PYTHON = r"""#!/bin/sh
# Stands in for python in install.sh: reports the bundle's version, makes a "venv" whose
# mesh-llm prints its arguments and MESH_LLM_BIN_DIR, and installs nothing.
case "$1" in
  -c) echo "@PYVER@" ;;
  -m) if [ "$2" = venv ]; then
        mkdir -p "$3/bin"
        cp "$0" "$3/bin/python"
        printf '%s\n' '#!/bin/sh' 'for a in "$@"; do printf "arg:%s\n" "$a"; done' \
          'printf "bin:%s\n" "$MESH_LLM_BIN_DIR"' > "$3/bin/mesh-llm"
        chmod +x "$3/bin/mesh-llm"
      fi ;;
esac
"""
HOSTILE_PREFIXES = [
    "with space",
    """it's "quoted" $(touch INJECTED-1) `touch INJECTED-2`; touch INJECTED-3""",
    "back\\slash ${HOME} $HOME \\$(touch INJECTED-4) '; touch INJECTED-5; '",
]


@pytest.mark.parametrize("name", HOSTILE_PREFIXES, ids=["space", "quotes-subst", "escapes"])
def test_install_sh_quotes_a_hostile_prefix(tmp_path: Path, name: str) -> None:
    """The real install.sh under /bin/sh (python stubbed: no wheels needed) with a PREFIX full
    of shell syntax: the launcher it writes runs the venv's mesh-llm in that very folder, with
    the arguments untouched, and nothing in the name is ever executed."""
    from meshcore_backend_llamacpp.bundle import install_script

    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    top = tmp_path / "bundle"
    (top / "bin").mkdir(parents=True)
    (top / "bin" / "llama-server").write_text("not a real binary")
    (top / "install.sh").write_text(install_script(pyver))
    stub = tmp_path / "python-stub"
    stub.write_text(STUB_PYTHON.replace("@PYVER@", pyver))
    stub.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    env = offline_env(PYTHON=str(stub), HOME=str(tmp_path / "home"))
    done = subprocess.run(["/bin/sh", str(top / "install.sh"), str(work / name)], cwd=work,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    prefix = work / name
    assert (prefix / "bin" / "llama-server").is_file()
    ran = subprocess.run([str(prefix / "mesh-llm"), "two words", "$(touch INJECTED-6)"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines() == ["arg:two words", "arg:$(touch INJECTED-6)",
                                       f"bin:{prefix / 'bin'}"]
    assert os.listdir(work) == [name], "a command pasted into the PREFIX ran"
    assert not list(tmp_path.rglob("INJECTED-*[0-9]"))


def test_install_sh_refuses_a_prefix_with_a_newline(tmp_path: Path) -> None:
    from meshcore_backend_llamacpp.bundle import install_script

    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    (tmp_path / "install.sh").write_text(install_script(pyver))
    done = subprocess.run(["/bin/sh", str(tmp_path / "install.sh"), str(tmp_path / "a\nb")],
                          env=offline_env(PYTHON=sys.executable), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr == "error: the install folder must not contain a newline; pick another\n"
    assert not (tmp_path / "a\nb").exists()
