"""Tokenizers: train a byte-level BPE, load a user's tokenizer, and encode documents in bulk."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (every byte representable, so no unknown token) with EOS = pad = <|endoftext|>, split into
    pre-tokens exactly as Qwen3.5's tokenizer does (NFC, its regex: one digit per pre-token, then byte-level).
    transformers loads every qwen3_5_moe checkpoint with Qwen3_5Tokenizer, which imposes that pipeline whatever
    tokenizer.json says (models/qwen3_5/tokenization_qwen3_5.py), so only a tokenizer trained this way exports to
    qwen3_5_moe with the ids the model learnt (the export checks it)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen3_5.tokenization_qwen3_5 import PRETOKENIZE_REGEX

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return wrap_tokenizer(tokenizer)


def wrap_tokenizer(tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a `tokenizers.Tokenizer` holding <|endoftext|> so transformers can save and use it."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )


def load_tokenizer(spec: str) -> PreTrainedTokenizerFast:
    """Load `spec`: a tokenizer.json file or a Hugging Face tokenizer directory. Pad falls back to EOS."""
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".json":
            raise ValueError(f"data.tokenizer={spec!r} is a file but not a tokenizer.json; point to one or to its dir")
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path))
    elif path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"data.tokenizer={spec!r} has no tokenizer.json (a fast tokenizer is needed); "
                "save one with tokenizer.save_pretrained() or use data.tokenizer=bpe"
            )
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    else:
        raise FileNotFoundError(
            f"data.tokenizer={spec!r} is neither 'bpe' nor an existing tokenizer.json / tokenizer dir"
        )
    if tokenizer.eos_token_id is None:
        if EOS_TOKEN not in tokenizer.get_vocab():
            raise ValueError(
                f"tokenizer {spec!r} has no EOS token; set eos_token in its tokenizer_config.json "
                f"or add {EOS_TOKEN} to it"
            )
        tokenizer.eos_token = EOS_TOKEN
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_sha256(tokenizer: PreTrainedTokenizerFast) -> str:
    """Content hash of the tokenizer's vocabulary, merges and special tokens."""
    payload = tokenizer.backend_tokenizer.to_str() + f"\0eos={tokenizer.eos_token_id}"
    return hashlib.sha256(payload.encode()).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def encode_documents(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text without added special tokens (the loader appends EOS itself), batched in Rust."""
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    dtype = token_dtype(len(tokenizer))
    return [np.asarray(encoding.ids, dtype=dtype) for encoding in encodings]
