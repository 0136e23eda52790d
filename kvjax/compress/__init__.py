"""Compression transforms: each method is a `Compressor` over one layer's cache."""

from kvjax.compress.adakv import adakv
from kvjax.compress.base import (
    Compressor,
    Observation,
    chain,
    identity,
    keep_topk,
    valid_slots,
)
from kvjax.compress.cake import cake, cake_calibrate
from kvjax.compress.cam import cam
from kvjax.compress.chunkkv import chunkkv
from kvjax.compress.decoding import decoding
from kvjax.compress.duo_attention import duo_attention
from kvjax.compress.ems import ems, global_local_scores
from kvjax.compress.expected_attention import expected_attention, expected_attention_scores
from kvjax.compress.h2o import h2o, h2o_scores
from kvjax.compress.knorm import knorm, knorm_scores
from kvjax.compress.kvmerger import kvmerger, window_attention_scores
from kvjax.compress.minicache import minicache
from kvjax.compress.pyramidkv import pyramid_budgets, pyramidkv
from kvjax.compress.scissorhands import scissorhands
from kvjax.compress.scorer import from_scorer
from kvjax.compress.snapkv import snapkv, snapkv_scores
from kvjax.compress.streaming_llm import streaming_llm, streaming_llm_scores
from kvjax.compress.tova import tova, tova_scores
from kvjax.compress.windowkv import windowkv
from kvjax.compress.zeromerge import zeromerge

__all__ = [
    "Compressor",
    "Observation",
    "adakv",
    "cake",
    "cake_calibrate",
    "cam",
    "chain",
    "chunkkv",
    "decoding",
    "duo_attention",
    "ems",
    "expected_attention",
    "expected_attention_scores",
    "from_scorer",
    "global_local_scores",
    "h2o",
    "h2o_scores",
    "identity",
    "keep_topk",
    "knorm",
    "knorm_scores",
    "kvmerger",
    "minicache",
    "pyramid_budgets",
    "pyramidkv",
    "scissorhands",
    "snapkv",
    "snapkv_scores",
    "streaming_llm",
    "streaming_llm_scores",
    "tova",
    "tova_scores",
    "valid_slots",
    "window_attention_scores",
    "windowkv",
    "zeromerge",
]
