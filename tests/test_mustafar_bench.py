"""experiments/bench_mustafar.py runs end to end on CPU with tiny flags (interpreted kernel)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_tiny_cpu(tmp_path):
    cmd = [
        sys.executable, os.path.join(ROOT, "experiments", "bench_mustafar.py"),
        "--contexts=48", "--batches=1", "--hq=4", "--hkv=2", "--head_dim=16",
        "--sparsities=0.5", "--block_sizes=16", "--calls=1", "--reps=1", "--dtype=float32",
        f"--out={tmp_path}",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((tmp_path / "bench_mustafar.json").read_text())
    assert not res["errors"]
    assert all(c["max_abs_err"] < 1e-4 for c in res["checks"]) and len(res["checks"]) == 1
    methods = {r["method"].split(" bs=")[0] for r in res["rows"]}
    expect = {"dense jnp (jit)", "jax dpa xla", "mustafar kernel", "mustafar jnp reference"}
    assert expect <= methods
    sparse = [r for r in res["rows"] if r.get("sparsity") == 0.5]
    dense = [r for r in res["rows"] if "sparsity" not in r]
    assert sparse[0]["bytes"] < dense[0]["bytes"] and all(r["us"] > 0 for r in res["rows"])
    assert (tmp_path / "bench_mustafar.md").read_text().startswith("Device:")
