"""kvpress as the executable reference: run a press on a transformers model and record which
original positions each (layer, KV head) keeps, plus the greedy tokens generated afterwards.

How kvpress applies a press (kvpress 0.5.5): `with press(model):` registers a forward hook on
every attention layer; during the prefill forward the hook calls `press.compress(module,
hidden_states, keys, values, attentions, kwargs)` and writes the returned keys/values into the
DynamicCache. Its pipeline then decodes greedily with explicit `position_ids` (original
positions; for KeyRerotationPress the compressed length). Decoding presses (DecodingPress,
PrefillDecodingPress) stay registered while decoding. Head-wise presses (DuoAttention) keep the
full cache and store `module.masked_key_indices`, which its patched attention masks.

Kept positions are recovered by wrapping `compress`: its output keys are exact copies of input
keys (unique thanks to RoPE), or under key re-rotation its values (in sorted order), so each
output slot is matched to its input slot, and a per-layer position table follows the cache
through prefill and decoding.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from hf_models import make_config


def quiet() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def save_sharp(kind: str, directory: str, seed: int = 0, qk_gain: float = 4.0):
    """A tiny random float32 checkpoint (as hf_models.save_tiny) with q/k projections scaled by
    `qk_gain`, so attention is peaked and scores rarely tie. Returns the directory."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(make_config(kind), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(qk_gain)
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def load_torch(directory: str, attn: str = "sdpa"):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation=attn
    )
    return model.eval()


def _match(out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor | None:
    """int64[B, H, n]: index of the identical input vector of each output vector, or None when
    some output has no unique match."""
    eq = (out[:, :, :, None, :] == inp[:, :, None, :, :]).all(-1)
    if not bool((eq.sum(-1) == 1).all()):
        return None
    return eq.to(torch.int64).argmax(-1)


def _match_sorted(out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    """Like `_match` for outputs in increasing input order (KeyRerotationPress sorts its
    indices): duplicates (equal values of equal tokens in layer 0) take the next free match."""
    eq = (out[:, :, :, None, :] == inp[:, :, None, :, :]).all(-1).numpy()
    b, h, n, k = eq.shape
    idx = np.zeros((b, h, n), np.int64)
    for i in range(b):
        for j in range(h):
            last = -1
            for s in range(n):
                cand = np.flatnonzero(eq[i, j, s, last + 1:])
                if cand.size == 0:
                    raise AssertionError("press output is not a sorted selection of its input")
                last = last + 1 + int(cand[0])
                idx[i, j, s] = last
    return torch.from_numpy(idx)


@dataclass
class Tracker:
    """Original positions of the cache slots of every layer, following kvpress's compress calls."""

    positions: dict = field(default_factory=dict)  # layer -> int64[B, H, n] (cache order)
    seen: dict = field(default_factory=dict)  # layer -> tokens appended so far

    def _extend(self, layer: int, length: int, batch: int, heads: int) -> torch.Tensor:
        cur = self.positions.get(layer, torch.zeros((batch, heads, 0), dtype=torch.int64))
        start = self.seen.get(layer, 0)
        extra = length - cur.shape[2]
        new = torch.arange(start, start + extra).expand(batch, heads, extra)
        self.seen[layer] = start + extra
        return torch.cat([cur, new], dim=2)

    def wrap(self, press) -> None:
        original = press.compress

        def compress(module, hidden_states, keys, values, attentions, kwargs):
            out_k, out_v = original(module, hidden_states, keys, values, attentions, kwargs)
            b, h, k, _ = values.shape
            full = self._extend(module.layer_idx, k, b, h)
            idx = _match(out_k, keys)  # keys are unique (RoPE), unless re-rotated
            if idx is None:
                idx = _match_sorted(out_v, values)
            self.positions[module.layer_idx] = torch.gather(full, 2, idx)
            return out_k, out_v

        press.compress = compress

    def final(self, cache) -> list[np.ndarray]:
        """Per layer int64[B, H, n] positions of the final cache (cache order)."""
        out = []
        for layer, cl in enumerate(cache.layers):
            b, h, n, _ = cl.values.shape
            out.append(self._extend(layer, n, b, h).numpy())
        return out


def kept_sets(positions: np.ndarray) -> list[set]:
    """[H] sets of positions of batch row 0."""
    return [set(map(int, row)) for row in positions[0]]


@torch.no_grad()
def run(
    model,
    input_ids: np.ndarray,
    press=None,
    max_new_tokens: int = 8,
    *,
    wrap: tuple = (),
    prefill_press: bool = True,
    decode_press: bool = False,
    rerotated: bool = False,
):
    """Prefill `input_ids` [1, T] under `press`, then greedy-decode like kvpress's pipeline.

    Args:
      wrap: the press objects whose `compress` the hooks call (tracked for kept positions).
      prefill_press / decode_press: whether the press context is active during prefill /
        decoding (DecodingPress: decoding only; PrefillDecodingPress: both).
      rerotated: continue at position = compressed length (KeyRerotationPress in the pipeline).
    Returns:
      (generated int64[max_new_tokens], per-layer positions int64[1, H, n] of the final cache,
       the final DynamicCache)
    """
    from transformers import DynamicCache

    tracker = Tracker()
    for p in wrap:
        tracker.wrap(p)
    ids = torch.tensor(np.asarray(input_ids), dtype=torch.long)
    t = ids.shape[1]
    cache = DynamicCache(config=model.config)
    use = press if (press is not None and prefill_press) else None
    with use(model) if use is not None else contextlib.nullcontext():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    tok = out.logits[0, -1].argmax()
    generated = [int(tok)]
    start = cache.get_seq_length() if rerotated else t
    use = press if (press is not None and decode_press) else None
    with use(model) if use is not None else contextlib.nullcontext():
        for i in range(max_new_tokens - 1):
            out = model(
                input_ids=tok.view(1, 1), past_key_values=cache,
                position_ids=torch.tensor([[start + i]]), use_cache=True,
            )
            tok = out.logits[0, -1].argmax()
            generated.append(int(tok))
    return np.array(generated), tracker.final(cache), cache


def masked_positions(model) -> list[list[set]]:
    """Per layer, per KV head: positions masked by a head-wise press (batch row 0)."""
    out = []
    for layer in model.model.layers:
        idx = getattr(layer.self_attn, "masked_key_indices", None)
        heads = model.config.num_key_value_heads
        sets = [set() for _ in range(heads)]
        if idx is not None:
            for b, h, s in zip(*(i.tolist() for i in idx)):
                if b == 0:
                    sets[h].add(s)
        out.append(sets)
    return out


@torch.no_grad()
def key_norm_scores(model, tokens: np.ndarray) -> list[np.ndarray]:
    """Per layer float32[H, N]: minus the key norms of an uncompressed forward over `tokens`
    [1, N] (Knorm scores; in layer 0 they depend only on each token, so repeated tokens tie)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor(np.asarray(tokens), dtype=torch.long), past_key_values=cache)
    return [-cl.keys[0].norm(dim=-1).numpy() for cl in cache.layers]
