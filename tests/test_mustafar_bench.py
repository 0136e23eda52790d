"""experiments/bench_mustafar.py --quick runs end to end on CPU (interpreted kernel)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_quick_cpu(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "bench_mustafar.py"), "--quick",
           "--sparsities=0.7", f"--out={tmp_path}"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((tmp_path / "bench_mustafar.json").read_text())
    assert not res["errors"], res["errors"]
    assert res["check_ok"] and len(res["checks"]) == 2  # bf16 with a bias, float32 without
    assert all(c["rel_err"] < 1e-2 for c in res["checks"])
    assert "lowered for cuda" in proc.stdout
    methods = {r["method"].split(" (")[0] for r in res["rows"]}
    assert {"dense jnp", "jax dpa xla", "mustafar kernel", "mustafar jnp reference"} <= methods
    sparse = [r for r in res["rows"] if r.get("sparsity") == 0.7]
    dense = [r for r in res["rows"] if "sparsity" not in r]
    assert sparse[0]["bytes"] < dense[0]["bytes"] and all(r["us"] > 0 for r in res["rows"])
    assert all("x_best_dense" in r for r in res["rows"])
    assert (tmp_path / "bench_mustafar.md").read_text().startswith("Device:")
