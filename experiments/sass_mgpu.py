"""Registers, spills and SASS instruction counts of the Mosaic GPU KIVI decode kernel per
launch option (ptxas runs inside the Mosaic GPU compile: on a GPU, or with `--aot h100` on any
host where the CUDA plugin is installed, through `pallas_kernels.aot.gpu_compile`).

Each option is compiled in its own subprocess with `MOSAIC_GPU_DUMP_PTXAS=1` and
`MOSAIC_GPU_DUMP_SASS=1` (the dumps go to that process's stdout), then the ptxas summary
(registers, spill stores / loads) and the SASS opcode histogram of the kernel are printed:
static instruction counts, i.e. the unrolled step body's cost per thread, not a timing. Same
shapes as `count_mgpu_ops.py` (1 x 2 KV heads, 4 query heads each, head dim 128, G 32, 4096
tokens), whose MLIR op counts this follows down to machine code.

    PYTHONPATH=. python3 experiments/sass_mgpu.py --out $OUT/sass              # GPU
    PYTHONPATH=. python3 experiments/sass_mgpu.py --out runs/sass --aot h100   # CPU host

The CPU form needs the test extras (`pip install -e ".[test]"`: the CUDA plugin, nvcc's ptxas,
nvdisasm for the SASS; the nvidia packages' `bin` folders are put on PATH).
"""

from __future__ import annotations

import argparse
import collections
import glob
import io
import json
import os
import re
import subprocess
import sys
import tarfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.count_mgpu_ops import CONFIGS  # noqa: E402

# opcodes with a column (the SASS mnemonic up to its first '.')
FAMILIES = ("LOP3", "SHF", "PRMT", "IMAD", "IADD3", "HADD2", "HMUL2", "HFMA2", "FMUL", "FADD",
            "FFMA", "MUFU", "F2F", "F2FP", "SHFL", "LDS", "STS", "LDG", "HGMMA", "BAR", "SYNCS",
            "WARPGROUP", "BRA")
_SASS = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)[.\s;]")

_COMPILE = """
import functools, json, sys
import jax
sys.path.insert(0, {root!r})
from experiments.bench_quant_mgpu import case
from pallas_kernels import quantized_decode_attention_mgpu as qm
cfg = json.loads({cfg!r})
bits = cfg.pop("words", 0)
_, _, args = case(jax.random.key(0), 1, 2, 4, 128, 32, ((4096, 4000),), 128, bits=bits or 4,
                  words=bool(bits))
f = functools.partial(qm.quantized_decode_attention_mgpu, **cfg)
if {aot!r}:
    from pallas_kernels.aot import gpu_compile
    gpu_compile({aot!r}, f, *args)
else:
    jax.block_until_ready(jax.jit(f)(*args))
print("COMPILED", flush=True)
"""


def parse(text: str) -> dict:
    """ptxas registers / spills and the SASS opcode histogram in one dump's text."""
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", text)]
    spill_st = [int(x) for x in re.findall(r"(\d+) bytes spill stores", text)]
    spill_ld = [int(x) for x in re.findall(r"(\d+) bytes spill loads", text)]
    ops = collections.Counter(m.group(1) for m in _SASS.finditer(text))
    fam = {f: ops.get(f, 0) for f in FAMILIES}
    return {"registers": max(regs, default=None), "spill_stores": max(spill_st, default=None),
            "spill_loads": max(spill_ld, default=None), "sass_total": sum(ops.values()),
            "families": fam, "opcodes": dict(ops.most_common())}


def nvidia_bins() -> list[str]:
    """The `bin` folders of the installed nvidia-* wheels (ptxas, nvdisasm)."""
    try:
        import nvidia  # noqa: PLC0415 - namespace package of the CUDA wheels
    except ImportError:
        return []
    return sorted(b for p in nvidia.__path__ for b in glob.glob(os.path.join(p, "*", "bin")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/sass_mgpu"))
    ap.add_argument("--configs", default="", help="JSON list instead of count_mgpu_ops.CONFIGS")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per compile")
    ap.add_argument("--aot", default="", help="compile for this aot.TARGETS GPU (e.g. h100) "
                    "without a GPU instead of running on the GPU")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "MOSAIC_GPU_DUMP_PTXAS": "1", "MOSAIC_GPU_DUMP_SASS": "1",
           "PYTHONPATH": root}
    if args.aot:
        env["JAX_PLATFORMS"] = "cpu"
        env["PATH"] = os.pathsep.join([*nvidia_bins(), env.get("PATH", "")])
    configs = json.loads(args.configs) if args.configs else list(CONFIGS)
    rows, dumps = [], []
    print("config | registers | spill st/ld B | SASS | " + " | ".join(FAMILIES), flush=True)
    for cfg in configs:
        code = _COMPILE.format(root=root, cfg=json.dumps(cfg), aot=args.aot)
        try:
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  env=env, timeout=args.timeout)
            text = proc.stdout + proc.stderr
            ok = "COMPILED" in proc.stdout
        except subprocess.TimeoutExpired as e:
            text, ok = str(e.stdout or "") + str(e.stderr or ""), False
        r = {"config": cfg, "ok": ok, **parse(text)}
        rows.append(r)
        dumps.append((re.sub(r"[^A-Za-z0-9_.-]", "_", json.dumps(cfg))[:80] + ".txt", text))
        if not ok:
            last = [ln for ln in text.strip().splitlines() if "Error" in ln][-1:]
            print(f"{json.dumps(cfg)} | FAILED: {last}", flush=True)
            continue
        fam = " | ".join(str(r["families"][f]) for f in FAMILIES)
        print(f"{json.dumps(cfg)} | {r['registers']} | {r['spill_stores']}/{r['spill_loads']} | "
              f"{r['sass_total']} | {fam}", flush=True)
    with open(os.path.join(args.out, "sass_mgpu.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with tarfile.open(os.path.join(args.out, "dumps.tar.gz"), "w:gz") as tar:  # one file back
        for name, text in dumps:
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


if __name__ == "__main__":
    main()
