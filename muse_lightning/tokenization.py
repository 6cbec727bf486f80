"""Tokenizers of the text data modules: UTF-8 bytes, or a Hugging Face ``tokenizers`` vocabulary.

- ``"byte"``: UTF-8 bytes as tokens (257 ids with padding), nothing to learn or download.
- ``"bpe"``, ``"wordpiece"``, ``"unigram"``: a vocabulary of ``vocab_size`` tokens trained on the
  training texts by Hugging Face ``tokenizers`` (offline, seconds), NFKC-normalised and lowercased,
  split on whitespace and punctuation first; ``[PAD]`` is id 0 and ``[UNK]`` id 1.
- a path to a ``tokenizer.json`` (what ``tokenizers`` and ``transformers`` save), or a ``transformers`` model
  folder holding one: used as it is.

Every tokenizer cuts texts at ``max_length`` tokens and pads a batch with its own padding id.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import tokenizers as tk
import torch

__all__ = ["TRAINED_KINDS", "ByteTokenizer", "HFTokenizer", "TokenizerKind", "create_tokenizer"]

TokenizerKind = Literal["byte", "bpe", "wordpiece", "unigram"]
TRAINED_KINDS: tuple[str, ...] = ("bpe", "wordpiece", "unigram")
_SPECIALS = ["[PAD]", "[UNK]"]
_PAD_TOKENS = ("[PAD]", "<pad>", "<PAD>", "<|pad|>")


def _reproducible_unigram(tokenizer: tk.Tokenizer) -> tk.Tokenizer:
    """A trained Unigram vocabulary that the same texts always give. The trainer orders pieces of equal score
    in hash-map order, which changes from run to run, and a piece's id is its place; it also gives the characters
    it must keep (those it did not learn) the lowest score or one step (1e-4) above it, in that same order. So the
    special tokens keep their ids; the bottom run of scores at most one step apart (those characters, and any
    piece as low) takes its scores in text order; every other piece goes by score (to 1e-9, where the trainer's
    sums differ in their last bits), then by text."""
    state = json.loads(tokenizer.to_str())
    pieces = [[piece, round(score, 9)] for piece, score in state["model"]["vocab"]]
    specials, pieces = pieces[: len(_SPECIALS)], pieces[len(_SPECIALS):]
    if [piece for piece, _ in specials] != _SPECIALS:
        raise RuntimeError(f"the Unigram trainer put other pieces than {_SPECIALS} first: {specials}")
    pieces.sort(key=lambda p: (-p[1], p[0]))
    start = len(pieces) - 1  # pieces[start:]: the bottom run, each score within a step of the next
    while start > 0 and pieces[start - 1][1] - pieces[start][1] < 1e-4 + 1e-7:
        start -= 1
    bottom = sorted(piece for piece, _ in pieces[start:])
    state["model"]["vocab"] = specials + pieces[:start] + [[piece, score] for piece, (_, score) in zip(bottom, pieces[start:])]
    return type(tokenizer).from_str(json.dumps(state))


class _Tokenizer:
    """``encode`` one text to ids (cut at ``max_length``); ``collate`` a batch with ``pad_id``."""

    pad_id: int
    vocab_size: int

    def __init__(self, max_length: int) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.max_length = max_length

    def ids(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode(self, text: str) -> torch.Tensor:
        """Token ids of ``text``, cut to ``max_length``; an empty text gives one padding token."""
        ids = self.ids(text)[: self.max_length]
        return torch.tensor(ids or [self.pad_id], dtype=torch.long)

    def collate(self, batch: Sequence[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
        """Pad a batch of ``(ids, label)`` to its longest sequence."""
        ids = torch.nn.utils.rnn.pad_sequence([b[0] for b in batch], batch_first=True, padding_value=self.pad_id)
        return {"input_ids": ids, "labels": torch.tensor([b[1] for b in batch], dtype=torch.long)}


class ByteTokenizer(_Tokenizer):
    """UTF-8 bytes as tokens: id ``b + 1`` for byte ``b``, 0 for padding; nothing to download."""

    pad_id = 0
    vocab_size = 257

    def ids(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode("utf-8")[: self.max_length]]


def _check_vocab_size(vocab_size: int) -> None:
    if vocab_size < len(_SPECIALS) + 1:
        raise ValueError(f"vocab_size must be at least {len(_SPECIALS) + 1} (padding, unknown and one token), got {vocab_size}")


class HFTokenizer(_Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer``; its padding token pads batches."""

    def __init__(self, tokenizer: tk.Tokenizer, max_length: int, source: str = "tokenizer") -> None:
        super().__init__(max_length)
        pad_id = tokenizer.padding["pad_id"] if tokenizer.padding else None
        if pad_id is None:
            pad_id = next((i for t in _PAD_TOKENS if (i := tokenizer.token_to_id(t)) is not None), None)
        if pad_id is None:
            raise ValueError(f"{source} has no padding token: give it one of {list(_PAD_TOKENS)} or enable its padding")
        tokenizer.enable_truncation(max_length)  # cut keeping its special tokens ([SEP] last)
        self.tokenizer = tokenizer
        self.pad_id = pad_id
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, kind: str, texts: Sequence[str], vocab_size: int, max_length: int) -> HFTokenizer:
        """A ``kind`` vocabulary of at most ``vocab_size`` tokens learnt from ``texts``."""
        if kind not in TRAINED_KINDS:
            raise ValueError(f"kind must be one of {TRAINED_KINDS}, got {kind!r}")
        _check_vocab_size(vocab_size)
        model, trainer = {
            "bpe": (tk.models.BPE(unk_token="[UNK]"), tk.trainers.BpeTrainer),
            "wordpiece": (tk.models.WordPiece(unk_token="[UNK]"), tk.trainers.WordPieceTrainer),
            "unigram": (tk.models.Unigram(), tk.trainers.UnigramTrainer),
        }[kind]
        extra = {"unk_token": "[UNK]"} if kind == "unigram" else {}
        tokenizer = tk.Tokenizer(model)
        tokenizer.normalizer = tk.normalizers.Sequence([tk.normalizers.NFKC(), tk.normalizers.Lowercase()])
        tokenizer.pre_tokenizer = tk.pre_tokenizers.Whitespace()
        if kind == "wordpiece":
            tokenizer.decoder = tk.decoders.WordPiece()  # joins "##" continuations back into words
        tokenizer.train_from_iterator(
            texts, trainer(vocab_size=vocab_size, special_tokens=_SPECIALS, show_progress=False, **extra),
        )
        if kind == "unigram":
            tokenizer = _reproducible_unigram(tokenizer)
        return cls(tokenizer, max_length, source=f"the {kind} vocabulary")

    @classmethod
    def from_file(cls, path: str | Path, max_length: int) -> HFTokenizer:
        """A saved ``tokenizer.json``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer: no such file {path}")
        try:
            tokenizer = tk.Tokenizer.from_file(str(path))
        except Exception as error:  # the Rust side raises its own exception type
            raise ValueError(f"tokenizer: {path} is not a Hugging Face tokenizer.json ({error})") from None
        return cls(tokenizer, max_length, source=str(path))

    @classmethod
    def from_str(cls, json: str, max_length: int) -> HFTokenizer:
        """A tokenizer from its JSON text (``to_str``), as checkpoints keep it."""
        return cls(tk.Tokenizer.from_str(json), max_length)

    def to_str(self) -> str:
        """The tokenizer as ``tokenizer.json`` text."""
        return self.tokenizer.to_str()

    def ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids


def create_tokenizer(tokenizer: str, max_length: int, vocab_size: int) -> _Tokenizer | None:
    """The tokenizer ``tokenizer`` names: a ``ByteTokenizer``, a loaded ``tokenizer.json``, or None for a
    vocabulary of ``vocab_size`` still to be trained (``"bpe"``, ``"wordpiece"``, ``"unigram"``)."""
    if tokenizer == "byte":
        return ByteTokenizer(max_length)
    if tokenizer in TRAINED_KINDS:
        _check_vocab_size(vocab_size)  # fail at construction, not after reading the data
        return None
    if tokenizer.endswith(".json"):
        return HFTokenizer.from_file(tokenizer, max_length)
    if Path(tokenizer).is_dir():  # a transformers model folder
        return HFTokenizer.from_file(Path(tokenizer) / "tokenizer.json", max_length)
    raise ValueError(
        f"tokenizer must be 'byte', one of {TRAINED_KINDS}, a path to a tokenizer.json or a folder holding one, "
        f"got {tokenizer!r}"
    )
