"""Data configuration: a plain dataclass used as the Hydra structured config of group `data`."""

from __future__ import annotations

from dataclasses import dataclass, field

SOURCES = ("stdlib", "text_files", "mqar", "memmap", "sft")
SFT_TRAIN_ON = ("assistant", "completion", "all")
SFT_FORMATS = ("auto", "messages", "prompt_completion")
MIN_BPE_VOCAB = 257  # 256 byte symbols + <|endoftext|>
DEFAULT_SHARD_TOKENS = 1 << 30  # tokens per .bin file written by prepare-data


@dataclass
class MQARConfig:
    """Synthetic multi-query associative recall (Arora et al. 2023, "Zoology").

    Each example is `k1 v1 ... kN vN` followed by `num_queries` pairs `k v` that repeat keys from the context in a
    random order; only the positions of the query keys carry a label (the value that follows). Rows are padded with
    token 0. Token ids: 0 = <|endoftext|> (pad), then `num_keys` key tokens, then the value tokens. Rows must hold
    `example_length` = 2 * (num_kv_pairs + num_queries) tokens.
    """

    num_kv_pairs: int = 16
    num_queries: int = 0  # 0 -> num_kv_pairs (every key is queried once)
    vocab_size: int = 256
    num_keys: int = 0  # 0 -> half of the non-special tokens are keys, the rest values
    num_examples: int = 20_000  # fixed training set, reshuffled every epoch
    num_val_examples: int = 1_000
    seed: int = 0  # fixes the examples; the run's seed only orders them

    def __post_init__(self) -> None:
        for name in ("num_kv_pairs", "vocab_size", "num_examples", "num_val_examples"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"data.mqar.{name}={value} must be >= 1")
        for name in ("num_queries", "num_keys"):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"data.mqar.{name}={value} must be >= 0 (0 picks the default)")
        if self.queries > self.num_kv_pairs:
            raise ValueError(
                f"data.mqar.num_queries={self.num_queries} exceeds num_kv_pairs={self.num_kv_pairs}: "
                "each query repeats a distinct key; lower num_queries"
            )
        if self.keys < self.num_kv_pairs:
            raise ValueError(
                f"data.mqar: {self.keys} key tokens (num_keys={self.num_keys}, vocab_size={self.vocab_size}) "
                f"cannot give num_kv_pairs={self.num_kv_pairs} distinct keys; raise vocab_size or num_keys"
            )
        if self.keys >= self.vocab_size - 1:
            raise ValueError(
                f"data.mqar.num_keys={self.num_keys} leaves no value tokens in vocab_size={self.vocab_size}; "
                "lower num_keys or raise vocab_size"
            )

    @property
    def queries(self) -> int:
        return self.num_queries or self.num_kv_pairs

    @property
    def keys(self) -> int:
        return self.num_keys or (self.vocab_size - 1) // 2

    @property
    def example_length(self) -> int:
        return 2 * (self.num_kv_pairs + self.queries)


@dataclass
class SFTConfig:
    """Supervised fine-tuning rows (`data.source=sft`, hybridlm.data.sft): `.jsonl` / `.parquet` files of
    conversations (`messages: [{role, content}, ...]`) or prompt/completion pairs, rendered with the tokenizer's chat
    template and packed whole into rows."""

    format: str = "auto"  # auto (per row: messages if it has messages_field) | messages | prompt_completion
    messages_field: str = "messages"
    role_field: str = "role"
    content_field: str = "content"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    # Which targets carry a loss: assistant (every assistant turn's content and its end-of-turn token), completion
    # (the last assistant turn only) or all (every token of the rendered conversation).
    train_on: str = "assistant"
    on_bad_row: str = "error"  # error | skip: malformed rows are counted and reported with their row numbers either way
    overlong: str = "truncate"  # a conversation longer than trainer.seq_len: truncate (cut the end) | error
    val_paths: list[str] = field(default_factory=list)  # held-out files; [] -> a hash split with data.val_fraction

    def __post_init__(self) -> None:
        choices = {"format": SFT_FORMATS, "train_on": SFT_TRAIN_ON, "on_bad_row": ("error", "skip"),
                   "overlong": ("truncate", "error")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"data.sft.{name}={getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        for name in ("messages_field", "role_field", "content_field", "prompt_field", "completion_field"):
            if not getattr(self, name):
                raise ValueError(f"data.sft.{name} is empty: name the field of the rows")


@dataclass
class DataConfig:
    """Where training text comes from and how it is tokenised, split and packed.

    source:
      stdlib      the Python standard library's .py files, one document per file (no download)
      text_files  `paths` are globs of .txt (one document per file), .jsonl (`text_field` of each line) or
                  .parquet (`text_field` column) files
      mqar        synthetic associative recall, see MQARConfig (no tokenizer training)
      memmap      `paths` are directories written by `hybridlm prepare-data`; their tokenizer is used
      sft         `paths` are globs of .jsonl / .parquet chat or prompt/completion rows, see SFTConfig; the tokenizer
                  is `tokenizer` (`checkpoint`: the one beside model.init_from)
    """

    source: str = "stdlib"
    paths: list[str] = field(default_factory=list)
    text_field: str = "text"
    tokenizer: str = "bpe"  # "bpe" trains a byte-level BPE on the train split; else tokenizer.json or HF dir
    vocab_size: int = 4096  # size of the trained BPE
    tokenizer_train_chars: int = 200_000_000  # BPE trains on a deterministic sample of this many characters
    cache_dir: str = ""  # "" -> $HYBRIDLM_CACHE or ~/.cache/hybridlm
    val_fraction: float = 0.02  # held-out share of documents, chosen by a hash of each document's text
    min_val_tokens: int = 0  # >0: fail before training when the held-out split is smaller than this
    max_documents: int = 0  # 0 = all; caps stdlib/text_files sources for quick runs
    pack: bool = True  # pack documents into rows (boundaries in cu_seqlens); False: one document per row, padded
    # Token stores: read every file once per store content (sha256 against the header, token ids against the
    # vocabulary); false keeps only the cheap checks (sizes, offsets, tokenizer), for a store too big to read at start
    verify_store_contents: bool = True
    mqar: MQARConfig = field(default_factory=MQARConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)

    def __post_init__(self) -> None:
        if isinstance(self.mqar, dict):  # built from a plain mapping rather than by OmegaConf
            self.mqar = MQARConfig(**self.mqar)
        if isinstance(self.sft, dict):
            self.sft = SFTConfig(**self.sft)
        if self.source not in SOURCES:
            raise ValueError(f"data.source={self.source!r} is not one of {', '.join(SOURCES)}")
        if self.source in ("text_files", "memmap", "sft") and not self.paths:
            what = {"text_files": "globs of .txt/.jsonl/.parquet files", "memmap": "prepare-data dirs",
                    "sft": "globs of .jsonl/.parquet conversation files"}[self.source]
            raise ValueError(f"data.source={self.source} needs data.paths: set data.paths=[...] to {what}")
        if self.source in ("stdlib", "mqar") and self.paths:
            raise ValueError(
                f"data.paths={list(self.paths)} is not used by data.source={self.source}; "
                "set data.source=text_files or memmap, or drop data.paths"
            )
        if not self.text_field:
            raise ValueError("data.text_field is empty: name the jsonl/parquet field holding the text")
        if not self.tokenizer:
            raise ValueError('data.tokenizer is empty: use "bpe" or a path to tokenizer.json / a HF tokenizer dir')
        if self.source == "sft" and self.tokenizer == "bpe":
            raise ValueError(
                "data.source=sft fine-tunes a trained model with its own tokenizer, so data.tokenizer=bpe (train a "
                "new one) does not apply: use data.tokenizer=checkpoint (model.init_from's) or a tokenizer path"
            )
        if self.source in ("memmap", "mqar") and self.tokenizer != "bpe":
            owner = "the store's own tokenizer.json" if self.source == "memmap" else "its own token ids"
            raise ValueError(
                f"data.tokenizer={self.tokenizer!r} is not used by data.source={self.source}, which uses {owner}; "
                "drop data.tokenizer"
            )
        if self.vocab_size < MIN_BPE_VOCAB:
            raise ValueError(f"data.vocab_size={self.vocab_size} must be >= {MIN_BPE_VOCAB} (256 bytes + EOS)")
        if self.tokenizer_train_chars < 1:
            raise ValueError(f"data.tokenizer_train_chars={self.tokenizer_train_chars} must be >= 1")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(
                f"data.val_fraction={self.val_fraction} must be in (0, 1): a held-out split is needed "
                "for validation and the unigram baseline"
            )
        if self.min_val_tokens < 0:
            raise ValueError(f"data.min_val_tokens={self.min_val_tokens} must be >= 0 (0 = no minimum)")
        if self.max_documents < 0:
            raise ValueError(f"data.max_documents={self.max_documents} must be >= 0 (0 = all documents)")
