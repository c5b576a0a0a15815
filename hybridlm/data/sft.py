"""Supervised fine-tuning data: chat rows -> chat template -> assistant-only labels -> whole conversations packed.

Rows (`.jsonl` lines or `.parquet` rows) hold a conversation (`messages: [{role, content}, ...]`, roles system, user,
assistant, tool) or a prompt/completion pair (strings, or lists of messages), field names from `data.sft`.
Malformed rows are counted by kind and reported with their first row numbers; `data.sft.on_bad_row` refuses
(default) or skips them.

Rendering goes through the tokenizer's own `apply_chat_template`, so the tokens trained on are the ones a user's
inference stack renders. A tokenizer without a template (our byte-level BPE) gets `CHATML_TEMPLATE` and its two
special tokens (`add_chat_template`; the trainer then grows the embedding, `resize_token_embeddings`).
Which tokens are trained (`data.sft.train_on`):
  assistant   every assistant turn: its content and end-of-turn token. Templates with `{% generation %}` blocks
              (ours) mark them through transformers' `return_assistant_tokens_mask`; for other templates the span of
              turn i is what rendering messages[:i+1] adds to messages[:i] + the generation prompt, so the template
              must render each conversation as an extension of its prefixes (otherwise the rows are refused).
  completion  the last assistant turn only (TRL's completion_only_loss for prompt/completion data)
  all         every token after the first
Labels are shifted (labels[t] is the target of input t, IGNORE_INDEX where untrained), as in hybridlm.data.packing.

Packing: each conversation is one segment, never split across rows; rows are filled by best-fit decreasing
(`best_fit_decreasing`) once, and the rows are reshuffled every epoch. `cu_seqlens` carries the boundaries, so the
model restarts GDN, conv and attention at each conversation exactly as in pretraining. A conversation longer than
`trainer.seq_len` is cut at the end (`data.sft.overlong=truncate`) or refused (`error`).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hybridlm.data.config import DataConfig, SFTConfig
from hybridlm.data.packing import Row
from hybridlm.loss import IGNORE_INDEX

ROLES = ("system", "user", "assistant", "tool")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# ChatML (Qwen's turn format) with transformers' `{% generation %}` markers around what the assistant writes, so
# `return_assistant_tokens_mask` finds the trained tokens: the content and <|im_end|>, not the newline after it.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")
REPORTED_ROWS = 5  # row numbers named per kind of bad row


class BadRowsError(ValueError):
    pass


def add_chat_template(tokenizer) -> list[str]:
    """Give a tokenizer without a chat template ours: <|im_start|> / <|im_end|> as special tokens, CHATML_TEMPLATE,
    and <|im_end|> as EOS (as in Qwen's chat tokenizers), so generation and lm-eval stop at the end of the turn.
    Returns the tokens added ([] when the tokenizer already has a template, which is then used as it is)."""
    if tokenizer.chat_template:
        return []
    from tokenizers import AddedToken

    new = [token for token in (IM_START, IM_END) if token not in tokenizer.get_vocab()]
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in new], special_tokens=True)
    tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.eos_token = IM_END
    return new


# --- rows ------------------------------------------------------------------------------------------------------------


@dataclass
class BadRows:
    """Malformed rows by kind: how many, and where the first few are (file:row, 1-based)."""

    where: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, kind: str, location: str) -> None:
        self.counts[kind] += 1
        if len(self.where[kind]) < REPORTED_ROWS:
            self.where[kind].append(location)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        return "; ".join(f"{n} {kind} ({', '.join(self.where[kind])}{', ...' if n > REPORTED_ROWS else ''})"
                         for kind, n in sorted(self.counts.items()))


def _records(path: Path) -> Iterator[tuple[int, object]]:
    """(1-based row number, parsed record) of a .jsonl (line numbers; blank lines skipped) or .parquet file."""
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        yield number, json.loads(line)
                    except json.JSONDecodeError:
                        yield number, _INVALID_JSON
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        number = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                number += 1
                yield number, record
    else:
        raise ValueError(f"data.source=sft reads .jsonl and .parquet files, not {path}")


_INVALID_JSON = object()


def _messages(value, cfg: SFTConfig) -> list[dict] | str:
    """A list of {role, content} dicts, or the kind of problem."""
    if not isinstance(value, list) or not value:
        return "messages not a non-empty list"
    messages = []
    for message in value:
        if not isinstance(message, dict) or not isinstance(message.get(cfg.role_field), str) \
                or not isinstance(message.get(cfg.content_field), str):
            return "messages of the wrong type (need {role: str, content: str})"
        role, content = message[cfg.role_field], message[cfg.content_field]
        if role not in ROLES:
            return f"unknown role (not one of {', '.join(ROLES)})"
        if not content.strip():
            return "empty content"
        messages.append({"role": role, "content": content})
    return messages


def conversation_of(record, cfg: SFTConfig) -> list[dict] | str:
    """The messages of one row, or the kind of problem that makes it unusable."""
    if record is _INVALID_JSON:
        return "invalid JSON"
    if not isinstance(record, dict):
        return "rows that are not objects"
    use_messages = cfg.format == "messages" or (cfg.format == "auto" and cfg.messages_field in record)
    if use_messages:
        if cfg.messages_field not in record:
            return f"no {cfg.messages_field!r} field"
        messages = _messages(record[cfg.messages_field], cfg)
    else:
        if cfg.prompt_field not in record or cfg.completion_field not in record:
            return f"no {cfg.messages_field!r} nor {cfg.prompt_field!r} + {cfg.completion_field!r} fields"
        parts = []
        for value, role in ((record[cfg.prompt_field], "user"), (record[cfg.completion_field], "assistant")):
            if isinstance(value, str):
                value = [{cfg.role_field: role, cfg.content_field: value}]
            part = _messages(value, cfg)
            if isinstance(part, str):
                return part
            parts.extend(part)
        messages = parts
        if isinstance(record[cfg.completion_field], list) and any(m["role"] != "assistant" for m in _messages(
                record[cfg.completion_field], cfg)):
            return "completions with non-assistant turns"
    if isinstance(messages, str):
        return messages
    if not any(message["role"] == "assistant" for message in messages):
        return "no assistant turn"
    return messages


def read_conversations(patterns: list[str], cfg: SFTConfig) -> tuple[list[tuple[str, list[dict]]], BadRows]:
    """Every usable row of the files matching `patterns` as (location, messages), and the bad rows. With
    on_bad_row=error any bad row raises, naming the kinds, counts and first row numbers."""
    from hybridlm.data.sources import text_files

    files = text_files(list(patterns))
    if not files:
        raise FileNotFoundError(f"data.paths={list(patterns)} match no .jsonl / .parquet files")
    good, bad = [], BadRows()
    for path in files:
        for number, record in _records(path):
            location = f"{path.name}:{number}"
            messages = conversation_of(record, cfg)
            if isinstance(messages, str):
                bad.add(messages, location)
            else:
                good.append((location, messages))
    if bad.total and cfg.on_bad_row == "error":
        raise BadRowsError(
            f"{bad.total} malformed SFT row(s) in {list(patterns)}: {bad.summary()}; fix them, or set "
            "data.sft.on_bad_row=skip to leave them out (they are still counted and reported)"
        )
    return good, bad


# --- rendering and labels --------------------------------------------------------------------------------------------


class ChatEncoder:
    """Token ids and shifted labels of a conversation rendered with the tokenizer's chat template."""

    def __init__(self, tokenizer, train_on: str):
        if not tokenizer.chat_template:
            raise ValueError("the tokenizer has no chat template; call hybridlm.data.sft.add_chat_template first")
        self.tokenizer = tokenizer
        self.train_on = train_on
        self.marked = bool(_GENERATION_BLOCK.search(tokenizer.chat_template))

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def trained_mask(self, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, mask): mask[t] says whether token t is a training target."""
        if self.marked:
            encoded = self.tokenizer.apply_chat_template(messages, return_assistant_tokens_mask=True)
            ids = np.asarray(encoded["input_ids"], dtype=np.int64)
            mask = np.asarray(encoded["assistant_masks"], dtype=bool)
            if self.train_on == "completion":  # the last run of marked tokens is the last assistant turn
                starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
                mask[: starts[-1]] = False
        else:
            ids, mask = self._mask_from_prefixes(messages)
        if self.train_on == "all":
            mask[:] = True
        return ids, mask

    def _mask_from_prefixes(self, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        text = self.render(messages)
        turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
        if self.train_on == "completion":
            turns = turns[-1:]
        spans = []
        for i in turns:
            before = self.render(messages[:i], add_generation_prompt=True) if i else ""
            after = self.render(messages[: i + 1])
            if not (text.startswith(after) and after.startswith(before)):
                raise ValueError(
                    "the tokenizer's chat template does not render a conversation as an extension of its prefixes "
                    "(e.g. it rewrites earlier turns), so the assistant tokens cannot be found from the text; add "
                    "{% generation %} ... {% endgeneration %} around the assistant content in its chat_template"
                )
            spans.append((len(before), len(after)))
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(encoded["input_ids"], dtype=np.int64)
        starts = np.asarray([start for start, _ in encoded["offset_mapping"]], dtype=np.int64)
        mask = np.zeros(len(ids), dtype=bool)
        for start, end in spans:
            mask |= (starts >= start) & (starts < end)
        return ids, mask

    def encode(self, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) of a conversation, see `shifted_labels`."""
        ids, mask = self.trained_mask(messages)
        return ids, shifted_labels(ids, mask)


def shifted_labels(targets: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """labels[t] = targets[t + 1] where token t + 1 is trained, else IGNORE_INDEX (the last token predicts nothing)."""
    labels = np.full(len(targets), IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = np.where(mask[1:], targets[1:], IGNORE_INDEX)
    return labels


# --- packing ---------------------------------------------------------------------------------------------------------


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins (lists of item indices) of at most `capacity` tokens: items longest first, each into the fullest bin
    it fits in, else a new bin. Deterministic (ties by index)."""
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, bin index), sorted
    for item in order:
        size = int(lengths[item])
        if size > capacity:
            raise ValueError(f"item {item} has {size} tokens, more than a row of {capacity}")
        slot = bisect.bisect_left(free, (size, -1))
        if slot == len(free):
            bins.append([item])
            room, index = capacity - size, len(bins) - 1
        else:
            room, index = free.pop(slot)
            bins[index].append(item)
            room -= size
        if room:
            bisect.insort(free, (room, index))
    return bins


class PackedConversations:
    """Rows of whole conversations (bins of `best_fit_decreasing`), visited in `order(epoch)`; the position is
    (epoch, cursor). The interface of hybridlm.data.packing.PackedRows, for the loader's rank split and resume."""

    def __init__(self, conversations: list[tuple[np.ndarray, np.ndarray]], bins: list[list[int]],
                 order: Callable[[int], np.ndarray], *, seq_len: int, pad_token_id: int, infinite: bool):
        self._conversations = conversations
        self._bins = bins
        self._order_for_epoch = order
        self.seq_len = seq_len
        self.pad_token_id = pad_token_id
        self.infinite = infinite
        self._set_position(0, 0)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._set_position(int(state["epoch"]), int(state["cursor"]))

    def _set_position(self, epoch: int, cursor: int) -> None:
        self.epoch, self.cursor = epoch, cursor
        self._order = self._order_for_epoch(epoch)

    def _next_bin(self) -> list[int] | None:
        if self.cursor == len(self._order):
            if not self.infinite:
                return None
            self._set_position(self.epoch + 1, 0)
        members = self._bins[int(self._order[self.cursor])]
        self.cursor += 1
        return members

    def skip_row(self) -> None:
        self._next_bin()

    def next_row(self) -> Row | None:
        members = self._next_bin()
        if members is None:
            return None
        seq_len = self.seq_len
        row = Row(input_ids=np.full(seq_len, self.pad_token_id, dtype=np.int64),
                  labels=np.full(seq_len, IGNORE_INDEX, dtype=np.int64),
                  position_ids=np.zeros(seq_len, dtype=np.int64), segment_starts=[])
        filled = 0
        for index in members:
            ids, labels = self._conversations[index]
            end = filled + len(ids)
            row.input_ids[filled:end], row.labels[filled:end] = ids, labels
            row.position_ids[filled:end] = np.arange(len(ids))
            row.segment_starts.append(filled)
            filled = end
        if filled < seq_len:  # the padding is a segment of its own, with no targets
            row.segment_starts.append(filled)
            row.position_ids[filled:] = np.arange(seq_len - filled)
        return row


@dataclass
class EncodedSplit:
    conversations: list[tuple[np.ndarray, np.ndarray]]  # (input_ids, labels) per conversation
    bins: list[list[int]]
    truncated: int  # conversations cut to seq_len
    locations: list[str]  # file:row of each conversation

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids, _ in self.conversations)

    @property
    def trained_tokens(self) -> int:
        return int(sum((labels != IGNORE_INDEX).sum() for _, labels in self.conversations))

    def padding_fraction(self, seq_len: int) -> float:
        return 1.0 - self.tokens / max(1, len(self.bins) * seq_len)

    def target_counts(self, vocab_size: int) -> np.ndarray:
        labels = np.concatenate([labels for _, labels in self.conversations])
        return np.bincount(labels[labels != IGNORE_INDEX], minlength=vocab_size)


def encode_split(rows: list[tuple[str, list[dict]]], encoder: ChatEncoder, cfg: SFTConfig, seq_len: int,
                 bad: BadRows) -> EncodedSplit:
    """Render, label and pack `rows`. Conversations longer than seq_len are cut (overlong=truncate) or refused;
    one left without a trained token is a bad row."""
    conversations, locations, too_long, truncated = [], [], [], 0
    for location, messages in rows:
        ids, labels = encoder.encode(messages)
        if len(ids) > seq_len:
            if cfg.overlong == "error":
                too_long.append(f"{location} ({len(ids)} tokens)")
                continue
            ids, labels = ids[:seq_len], labels[:seq_len].copy()
            labels[-1] = IGNORE_INDEX  # its target was cut off
            truncated += 1
        if not (labels != IGNORE_INDEX).any():
            bad.add("rows with no trained token after rendering (or truncation)", location)
            continue
        conversations.append((ids, labels))
        locations.append(location)
    if too_long:
        raise ValueError(
            f"{len(too_long)} conversation(s) are longer than trainer.seq_len={seq_len}: "
            f"{', '.join(too_long[:REPORTED_ROWS])}{', ...' if len(too_long) > REPORTED_ROWS else ''}; raise "
            "trainer.seq_len or set data.sft.overlong=truncate to cut them at the end"
        )
    if bad.total and cfg.on_bad_row == "error":
        raise BadRowsError(
            f"{bad.total} malformed SFT row(s): {bad.summary()}; fix them or set data.sft.on_bad_row=skip"
        )
    bins = best_fit_decreasing(np.asarray([len(ids) for ids, _ in conversations]), seq_len)
    return EncodedSplit(conversations, bins, truncated, locations)


def conversation_batches(patterns: list[str], tokenizer, cfg: SFTConfig, *, seq_len: int,
                         batch_size: int) -> tuple[Iterator[dict], EncodedSplit]:
    """Every usable conversation of the files once, packed as in training, as batches of `batch_size` rows (the last
    may be smaller); and the encoded split (counts). For scoring a model on held-out SFT data."""
    from hybridlm.data.loader import epoch_order
    from hybridlm.data.packing import collate

    rows, bad = read_conversations(patterns, cfg)
    split = encode_split(rows, ChatEncoder(tokenizer, cfg.train_on), cfg, seq_len, bad)
    packed = PackedConversations(split.conversations, split.bins, epoch_order(len(split.bins), seed=0, shuffle=False),
                                 seq_len=seq_len, pad_token_id=tokenizer.pad_token_id, infinite=False)

    def batches() -> Iterator[dict]:
        for start in range(0, len(split.bins), batch_size):
            yield collate([packed.next_row() for _ in range(min(batch_size, len(split.bins) - start))])

    return batches(), split


def resolve_sft_tokenizer(cfg: DataConfig, init_from: str):
    """The tokenizer of an SFT run (data.tokenizer=checkpoint: the one beside model.init_from) with a chat template
    (ours added when it has none)."""
    from hybridlm.data.tokenizer import load_tokenizer

    spec = cfg.tokenizer
    if spec == "checkpoint":
        if not init_from:
            raise ValueError("data.tokenizer=checkpoint takes the tokenizer of model.init_from, which is not set; "
                             "set model.init_from=PATH or data.tokenizer to a tokenizer directory")
        from hybridlm.checkpoint.reader import find_tokenizer_dir

        found = find_tokenizer_dir(init_from)
        if found is None:
            raise FileNotFoundError(f"model.init_from={init_from!r} has no tokenizer beside it; set data.tokenizer "
                                    "to the tokenizer directory it was trained with")
        spec = str(found)
    tokenizer = load_tokenizer(spec)
    add_chat_template(tokenizer)
    return tokenizer


def fingerprint(cfg: DataConfig, tokenizer) -> str:
    """Identifies the rows (file contents, not paths or times: a copied dataset resumes), how they are rendered and
    the tokenizer, so a resume with other data is refused by the loader."""
    from hybridlm.data.sources import text_files
    from hybridlm.data.tokenizer import tokenizer_sha256

    digest = hashlib.sha256()
    for path in text_files(list(cfg.paths) + list(cfg.sft.val_paths)):
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    digest.update(json.dumps([str(cfg.sft), tokenizer_sha256(tokenizer), tokenizer.chat_template]).encode())
    return "sft-" + digest.hexdigest()[:16]


def build_sft_data(cfg: DataConfig, *, seq_len: int, seed: int, init_from: str, slicing: dict, log=print):
    """The DataBundle of an SFT run (see hybridlm.data.build_data): packed conversation rows for training and
    validation, the unigram baseline over trained targets, and the padding fraction in `stats`."""
    import torch

    from hybridlm.data import DataBundle, _check_val_size, unigram_cross_entropy, unigram_log_probs
    from hybridlm.data.loader import TrainIterator, ValidationBatches, epoch_order
    from hybridlm.data.sources import is_validation_document

    tokenizer = resolve_sft_tokenizer(cfg, init_from)
    encoder = ChatEncoder(tokenizer, cfg.sft.train_on)
    rows, bad = read_conversations(cfg.paths, cfg.sft)
    if cfg.sft.val_paths:
        val_rows, val_bad = read_conversations(cfg.sft.val_paths, cfg.sft)
    else:  # a hash of the conversation picks the held-out rows, as for pretraining documents
        held_out = [is_validation_document(json.dumps(messages, sort_keys=True), cfg.val_fraction)
                    for _, messages in rows]
        val_rows = [row for row, out in zip(rows, held_out) if out]
        rows = [row for row, out in zip(rows, held_out) if not out]
        val_bad = BadRows()
    train = encode_split(rows, encoder, cfg.sft, seq_len, bad)
    val = encode_split(val_rows, encoder, cfg.sft, seq_len, val_bad)
    for name, split, split_bad in (("training", train, bad), ("validation", val, val_bad)):
        if split_bad.total:
            log(f"WARNING: skipped {split_bad.total} malformed SFT row(s) of the {name} data "
                f"(data.sft.on_bad_row=skip): {split_bad.summary()}")
        if not split.conversations:
            raise ValueError(f"the SFT {name} data has no usable conversation; check data.paths / data.sft.val_paths")
    pad = tokenizer.pad_token_id

    def packed(split: EncodedSplit, *, shuffle: bool, infinite: bool) -> PackedConversations:
        order = epoch_order(len(split.bins), seed=seed, shuffle=shuffle)
        return PackedConversations(split.conversations, split.bins, order, seq_len=seq_len, pad_token_id=pad,
                                   infinite=infinite)

    train_iter = TrainIterator(packed(train, shuffle=True, infinite=True), seed=seed,
                               data_fingerprint=fingerprint(cfg, tokenizer), **slicing)
    val_batches = ValidationBatches(lambda: packed(val, shuffle=False, infinite=False), len(val.bins), **slicing)
    _check_val_size(val_batches, len(val.bins), slicing["micro_batch_size"] * slicing["world_size"],
                    "add held-out conversations (data.sft.val_paths or data.val_fraction)")
    vocab_size = len(tokenizer)
    train_counts, val_counts = train.target_counts(vocab_size), val.target_counts(vocab_size)
    stats = {
        "train_conversations": len(train.conversations), "train_rows": len(train.bins),
        "train_tokens": train.tokens, "train_trained_tokens": train.trained_tokens,
        "padding_fraction": round(train.padding_fraction(seq_len), 4), "truncated": train.truncated,
        "skipped_rows": bad.total + val_bad.total,
        "val_conversations": len(val.conversations), "val_batches": val_batches.num_batches,
    }
    return DataBundle(tokenizer, train_iter, val_batches, vocab_size, unigram_cross_entropy(train_counts, val_counts),
                      torch.from_numpy(unigram_log_probs(train_counts)), stats)
