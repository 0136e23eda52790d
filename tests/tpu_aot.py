"""Runs a script of ahead-of-time TPU compiles (libtpu, no TPU) in a subprocess of its own."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPOLOGIES = ("v4:2x2x1", "v5e:2x2", "v6e:2x2")


def compiled_lines(script: str, expected: int) -> list[str]:
    """Runs `script` with TOPOLOGIES as its arguments; asserts it exits 0 and printed
    `expected` lines starting with COMPILED per topology; returns those lines. A process of
    its own because the compiles create a TPU compile-only client."""
    proc = subprocess.run([sys.executable, "-c", script, *TOPOLOGIES], capture_output=True,
                          text=True, timeout=900, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("COMPILED")]
    assert proc.returncode == 0 and len(lines) == expected * len(TOPOLOGIES), (
        proc.stdout[-2000:] + proc.stderr[-3000:])
    return lines
