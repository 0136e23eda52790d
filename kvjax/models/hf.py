"""Hugging Face checkpoints: config.json + safetensors (single file or sharded index). Never pickle.

    model = kvjax.models.load("path/to/checkpoint")        # or a hub repo id, network permitting
    kvjax.models.save(model, "out/")                       # transformers can load the result
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax.models.llama import Llama, LlamaConfig, from_hf_config, to_hf_config

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _param_map(model: Llama) -> Iterator[tuple[str, nnx.Variable, bool]]:
    """(HF tensor name, the kvjax variable, transpose?) for every parameter."""
    c = model.config
    yield "model.embed_tokens.weight", model.embed_tokens.embedding, False
    for i, block in enumerate(model.layers):
        p = f"model.layers.{i}."
        attn = block.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lin = getattr(attn, name)
            yield f"{p}self_attn.{name}.weight", lin.kernel, True
            if lin.bias is not None:
                yield f"{p}self_attn.{name}.bias", lin.bias, False
        if c.qk_norm:
            yield f"{p}self_attn.q_norm.weight", attn.q_norm.weight, False
            yield f"{p}self_attn.k_norm.weight", attn.k_norm.weight, False
        for name in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(block.mlp, name)
            yield f"{p}mlp.{name}.weight", lin.kernel, True
            if lin.bias is not None:
                yield f"{p}mlp.{name}.bias", lin.bias, False
        yield f"{p}input_layernorm.weight", block.input_layernorm.weight, False
        yield f"{p}post_attention_layernorm.weight", block.post_attention_layernorm.weight, False
    yield "model.norm.weight", model.norm.weight, False
    if not c.tie_word_embeddings:
        yield "lm_head.weight", model.lm_head.kernel, True


def _resolve(path_or_repo_id: str | os.PathLike) -> str:
    path = os.fspath(path_or_repo_id)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ValueError(f"{path} is a file; pass the checkpoint directory")
    if path.startswith((".", "/")) or path.count("/") != 1:
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise FileNotFoundError(
            f"{path} is not a local directory and huggingface_hub is not installed"
        ) from e
    try:
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors"])
    except Exception as e:  # network errors differ by version; report them plainly
        raise FileNotFoundError(
            f"{path} is not a local directory and could not be fetched from the hub: {e}"
        ) from e


def _shards(directory: str) -> dict[str, str]:
    """{tensor name: safetensors file path}."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(directory, f))]
        if missing:
            raise FileNotFoundError(
                f"missing safetensors shard(s) {missing} listed in {index}"
            )
        return {k: os.path.join(directory, v) for k, v in weight_map.items()}
    single = os.path.join(directory, "model.safetensors")
    if not os.path.exists(single):
        if any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(directory)):
            raise FileNotFoundError(
                f"{directory} has only pickle weights (.bin/.pt); kvjax reads safetensors only"
            )
        raise FileNotFoundError(
            f"no model.safetensors or model.safetensors.index.json in {directory}"
        )
    from safetensors import safe_open

    with safe_open(single, framework="flax") as f:
        return {k: single for k in f.keys()}


def load_config(path: str | os.PathLike) -> LlamaConfig:
    config_file = os.path.join(os.fspath(path), "config.json")
    if not os.path.exists(config_file):
        raise FileNotFoundError(f"no config.json in {path}")
    with open(config_file) as f:
        return from_hf_config(json.load(f))


def load(path_or_repo_id: str | os.PathLike, dtype: Any = None) -> Llama:
    """Loads a Llama/Mistral/Qwen2/Qwen3 checkpoint.

    dtype: parameter and compute dtype; default the checkpoint's `torch_dtype`/`dtype`
    (float32 when unset).
    """
    from safetensors import safe_open

    directory = _resolve(path_or_repo_id)
    config = load_config(directory)
    with open(os.path.join(directory, "config.json")) as f:
        raw = json.load(f)
    if dtype is None:
        dtype = _DTYPES.get(str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
                            jnp.float32)
    model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0), dtype=dtype))
    shards = _shards(directory)
    expected = {name for name, _, _ in _param_map(model)}
    missing = sorted(expected - set(shards))
    if missing:
        raise ValueError(
            f"checkpoint {directory} lacks tensors {missing[:5]} ({len(missing)} in all)"
        )
    handles: dict[str, Any] = {}
    try:
        for name, var, transpose in _param_map(model):
            file = shards[name]
            if file not in handles:
                handles[file] = safe_open(file, framework="flax").__enter__()
            arr = handles[file].get_tensor(name)
            if transpose:
                arr = arr.T
            if tuple(arr.shape) != tuple(var.shape):
                raise ValueError(f"tensor {name} has shape {arr.shape}, expected {var.shape}")
            var.set_value(jnp.asarray(arr, dtype))
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    return model


def save(model: Llama, path: str | os.PathLike) -> None:
    """Writes config.json + model.safetensors that transformers and `load` read.

    Tensors are stored as float32 (numpy has no bfloat16); config.json records the model's
    dtype, which `load` uses by default.
    """
    from safetensors.numpy import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tensors = {}
    for name, var, transpose in _param_map(model):
        arr = jax.device_get(var[...])
        if transpose:
            arr = arr.T
        tensors[name] = np.ascontiguousarray(np.asarray(arr, np.float32))
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(to_hf_config(model.config, model.dtype), f, indent=2)
