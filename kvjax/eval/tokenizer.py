"""Tokenizers for the evaluation suite: the project's byte-level tokenizer and Hugging Face ones.

Both satisfy one small interface (`Tokenizer`):

    tok.encode("text") -> list[int]     # no special tokens added
    tok.decode(ids) -> str              # special tokens dropped
    tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id

`ByteTokenizer`: ids 0..255 are the UTF-8 bytes, then `<pad>` 256, `<bos>` 257, `<eos>` 258;
the vocabulary is padded to 264 rows (a multiple of 8). `ByteTokenizer.save(dir)` writes a
`tokenizer.json` that the `tokenizers` package (and transformers' PreTrainedTokenizerFast)
reads with identical ids, so the project's checkpoints look like any Hugging Face checkpoint.

`load_tokenizer(path)` reads a checkpoint directory's `tokenizer.json` (or the file itself): the
project's byte tokenizer comes back as a `ByteTokenizer`, anything else as an `HFTokenizer`
wrapping `tokenizers.Tokenizer`, so a real model's tokenizer plugs into the suite unchanged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, Protocol

BYTE_SPECIALS = ("<pad>", "<bos>", "<eos>")
BYTE_VOCAB_SIZE = 264  # 256 bytes + 3 specials, padded to a multiple of 8


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (used by `tokenizers`' ByteLevel)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
                 + list(range(ord("\xae"), ord("\xff") + 1)))
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0..255) plus `<pad>`, `<bos>`, `<eos>` (256, 257, 258)."""

    vocab_size = BYTE_VOCAB_SIZE
    pad_id = 256
    bos_id = 257
    eos_id = 258

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def to_hf_json(self) -> dict[str, Any]:
        """The `tokenizer.json` dict (byte-level BPE without merges) giving the same ids."""
        vocab = {c: b for b, c in _bytes_to_unicode().items()}
        added = [
            {"id": 256 + i, "content": s, "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": True}
            for i, s in enumerate(BYTE_SPECIALS)
        ]
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False,
                              "trim_offsets": False, "use_regex": False},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                        "use_regex": False},
            "model": {"type": "BPE", "dropout": None, "unk_token": None,
                      "continuing_subword_prefix": None, "end_of_word_suffix": None,
                      "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": []},
        }

    def save(self, directory: str | os.PathLike) -> None:
        """Writes tokenizer.json and tokenizer_config.json (readable by transformers)."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "tokenizer.json"), "w") as f:
            json.dump(self.to_hf_json(), f, ensure_ascii=False)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>",
                  "eos_token": "<eos>", "pad_token": "<pad>", "model_max_length": 1 << 30}
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump(config, f, indent=1)


class HFTokenizer:
    """A `tokenizers.Tokenizer` behind the suite's interface.

    bos/eos/pad come from `tokenizer_config.json` beside `tokenizer.json` when present
    (token strings, or {"content": ...} dicts), else from the arguments.
    """

    def __init__(self, tokenizer: Any, bos: str | None = None, eos: str | None = None,
                 pad: str | None = None):
        self._tok = tokenizer
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
        self.bos_id = None if bos is None else tokenizer.token_to_id(bos)
        self.eos_id = None if eos is None else tokenizer.token_to_id(eos)
        self.pad_id = None if pad is None else tokenizer.token_to_id(pad)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def _special(config: dict[str, Any], name: str) -> str | None:
    value = config.get(name)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_tokenizer(path: str | os.PathLike) -> ByteTokenizer | HFTokenizer:
    """The tokenizer of a checkpoint directory (its tokenizer.json) or of a tokenizer.json file.

    Raises FileNotFoundError naming the path when there is no tokenizer.json.
    """
    path = os.fspath(path)
    file = path if path.endswith(".json") else os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"tokenizer file {file} not found: pass a checkpoint directory holding "
            "tokenizer.json, or the path of a tokenizer.json file"
        )
    with open(file, encoding="utf-8") as f:
        spec = json.load(f)
    if spec == json.loads(json.dumps(ByteTokenizer().to_hf_json(), ensure_ascii=False)):
        return ByteTokenizer()
    import tokenizers

    config: dict[str, Any] = {}
    config_file = os.path.join(os.path.dirname(file), "tokenizer_config.json")
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    return HFTokenizer(tokenizers.Tokenizer.from_file(file), _special(config, "bos_token"),
                       _special(config, "eos_token"), _special(config, "pad_token"))
