"""Ahead-of-time compiles for an accelerator this host lacks: a TPU (`tpu_compile`, libtpu's
topologies) or an NVIDIA GPU (`gpu_compile`, the CUDA plugin's compile-only devices). Both
run the real toolchain on a CPU host; nothing runs, so numbers still need the accelerator or
the interpreter.

TPU: libtpu (a test dependency pinned to jax's version) compiles for one device of a topology
such as "v5e:2x2", through Mosaic TPU's layout and tiling passes.

GPU: XLA's GPU compiler compiles for a device it is only described: the CUDA plugin
(`jax-cuda13-plugin`, whose `xla_cuda_plugin` holds XLA's GPU compiler and Mosaic GPU's
pipeline) takes a `GpuTargetConfigProto` text as the topology's `target_config` and hands out
compile-only devices. Compiling a Pallas kernel for such a device runs its whole toolchain as
on the GPU: Mosaic GPU's lowering to PTX and ptxas for sm_90a (or Triton's), so a kernel that
compiles here is accepted by the compiler and the `MOSAIC_GPU_DUMP_PTXAS` /
`MOSAIC_GPU_DUMP_SASS` dumps (registers, spills, SASS; SASS needs `nvdisasm` on PATH) are the
GPU's.

Run either in a process of its own whose default backend is the CPU (`JAX_PLATFORMS=cpu`): the
compiles create compile-only clients.
"""

from __future__ import annotations

import jax

# GpuTargetConfigProto of an H100 SXM 80GB (sm_90): the device figures XLA's GPU compiler
# reads (the H100's published limits: 132 SMs, 228 KiB shared memory per SM of which 227 KiB
# per block, 64 K registers per SM, 50 MiB L2, 3.35 TB/s HBM3).
H100 = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  shared_memory_per_block_optin: 232448
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84978434048
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
device_description_str: "NVIDIA H100 80GB HBM3"
"""
TARGETS = {"h100": H100}


def compile_on(device: jax.Device, platform: str, fn, *arrays) -> jax.stages.Compiled:
    """Compiles `fn(*arrays)` for a compile-only `device` of `platform` ("tpu" or "cuda");
    arrays may be arrays, `jax.ShapeDtypeStruct`s or None. Raises where a compiler rejects a
    kernel."""
    sharding = jax.sharding.SingleDeviceSharding(device)
    avals = [None if x is None else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
             for x in arrays]
    return jax.jit(fn).trace(*avals).lower(lowering_platforms=(platform,)).compile()


def tpu_compile(topology: str, fn, *arrays) -> jax.stages.Compiled:
    """`compile_on` one device of the TPU `topology` (e.g. "v5e:2x2", "v4:2x2x1", "v6e:2x2");
    needs libtpu installed, no TPU. Raises where Pallas or Mosaic rejects a kernel."""
    from jax.experimental import topologies  # noqa: PLC0415 - needs libtpu at call time

    dev = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices[0]
    return compile_on(dev, "tpu", fn, *arrays)


def gpu_device(target: str = "h100") -> jax.Device:
    """A compile-only CUDA device described by TARGETS[target] (no GPU needed)."""
    from jax.experimental import topologies  # noqa: PLC0415 - needs the CUDA plugin

    if target not in TARGETS:
        raise ValueError(f"target must be one of {sorted(TARGETS)}, got {target!r}")
    topo = topologies.get_topology_desc(target, "cuda", target_config=TARGETS[target],
                                        topology="1x1x1")
    return topo.devices[0]


def gpu_compile(target: str, fn, *arrays) -> jax.stages.Compiled:
    """`compile_on` the compile-only `target` GPU (e.g. "h100"); needs the CUDA plugin, no
    GPU. Raises where Pallas, Mosaic GPU, Triton or ptxas reject a kernel."""
    return compile_on(gpu_device(target), "cuda", fn, *arrays)
