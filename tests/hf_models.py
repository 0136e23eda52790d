"""Tiny random transformers checkpoints for parity tests (CPU, saved with save_pretrained)."""

from __future__ import annotations

import os

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)

KINDS = ("llama", "llama3", "mistral", "qwen2", "qwen3")


def make_config(kind: str):
    import transformers

    if kind == "llama":
        return transformers.LlamaConfig(**TINY, tie_word_embeddings=False)
    if kind == "llama3":  # Llama-3 RoPE scaling, tied embeddings, 8 query heads per KV head
        return transformers.LlamaConfig(
            **{**TINY, "num_attention_heads": 8, "num_key_value_heads": 1, "hidden_size": 128,
               "max_position_embeddings": 1024},
            tie_word_embeddings=True,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
            rope_theta=500000.0,
        )
    if kind == "mistral":
        return transformers.MistralConfig(**TINY, sliding_window=None)
    if kind == "qwen2":
        return transformers.Qwen2Config(**TINY)
    if kind == "qwen3":
        return transformers.Qwen3Config(**{**TINY, "head_dim": 32})
    raise ValueError(kind)


def save_tiny(kind: str, directory: str, seed: int = 0):
    """Builds a random float32 model of `kind`, saves it, returns the torch model (eval mode)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = make_config(kind)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    # Random (not default-initialised) norm weights and biases so every tensor matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.eval()
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    return model
