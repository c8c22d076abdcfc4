"""Benchmark: ``mesh-llm --help`` start-up and Ctrl-C shutdown, against a bare Python start.

Run: ``.venv/bin/python bench/cli_startup.py [RUNS]``. Prints medians and ratios; the numbers
go in docs/benchmarks.md ("CLI start-up time"). Nothing here is asserted by the test suite.
"""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

PY = sys.executable


def timed(cmd: list[str], runs: int) -> float:
    """Median wall time of ``cmd`` in seconds (one warm-up run first)."""
    subprocess.run(cmd, capture_output=True, check=True)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def shutdown_time(sig: int, home: str) -> float:
    """Seconds from ``sig`` to exit of a fake-backend node that is serving."""
    env = {**os.environ, "MESH_LLM_HOME": home, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([PY, "-m", "meshcore_cli", "--model", "x", "--backend", "fake",
                             "--transport", "memory", "--port", "0"],
                            stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    for line in proc.stderr:
        if re.search(r"plan SOLO", line):
            break
    start = time.perf_counter()
    proc.send_signal(sig)
    code = proc.wait(30)
    elapsed = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"node exited {code} after {signal.Signals(sig).name}")
    return elapsed


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    bare = timed([PY, "-c", "pass"], runs)
    help_ = timed([PY, "-m", "meshcore_cli", "--help"], runs)
    plugins = timed([PY, "-m", "meshcore_cli", "plugins"], runs)
    heavy = timed([PY, "-c", "import meshcore.node, meshcore.api, meshcore_transport_quic."
                              "transport"], runs)
    print(f"python -c pass            {bare * 1000:7.0f} ms   1.0x")
    print(f"mesh-llm --help           {help_ * 1000:7.0f} ms  {help_ / bare:4.1f}x")
    print(f"mesh-llm plugins          {plugins * 1000:7.0f} ms  {plugins / bare:4.1f}x")
    print(f"import node+api+quic      {heavy * 1000:7.0f} ms  {heavy / bare:4.1f}x "
          f"(what --help avoids)")
    with tempfile.TemporaryDirectory() as home:
        for sig in (signal.SIGINT, signal.SIGTERM):
            stops = [shutdown_time(sig, home) for _ in range(3)]
            print(f"{signal.Signals(sig).name:7} to exit (fake)   "
                  f"{statistics.median(stops) * 1000:7.0f} ms  (median of 3)")


if __name__ == "__main__":
    main()
