"""What `prepare-data --curate` runs, with which settings: a plain dataclass, checked before any work."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

# In pipeline order. `default` is FineWeb's recipe without its model-based steps (language ID, perplexity).
STAGES = ("exact", "minhash", "gopher_repetition", "gopher_quality", "c4", "fineweb_quality", "decontaminate")
DEFAULT_STAGES = ("exact", "minhash", "gopher_repetition", "gopher_quality", "c4", "fineweb_quality")
EXECUTORS = ("local", "slurm")
# datatrove's filters that fetch a model or word list at run time: not offered (the pipeline runs offline).
NEEDS_DOWNLOAD = {
    "language": "fastText's lid.176 language-ID model",
    "badwords": "the LDNOOBW bad-words lists",
    "perplexity": "a KenLM model",
}


FILTER_SETTINGS = ("gopher_repetition", "gopher_quality", "c4", "fineweb_quality")


def parse_stages(spec: str) -> tuple[str, ...]:
    """`none`, `default` or a comma list of STAGES (in any order; they run in pipeline order)."""
    spec = spec.strip()
    if spec in ("", "none"):
        return ()
    if spec == "default":
        return DEFAULT_STAGES
    names = [name.strip() for name in spec.split(",") if name.strip()]
    for name in names:
        if name in NEEDS_DOWNLOAD:
            raise ValueError(
                f"--curate stage {name!r} needs {NEEDS_DOWNLOAD[name]}, downloaded at run time; the curation "
                f"pipeline runs offline, so it offers only {', '.join(STAGES)}"
            )
        if name not in STAGES:
            raise ValueError(f"--curate stage {name!r} is not one of none, default, {', '.join(STAGES)}")
    return tuple(stage for stage in STAGES if stage in names)


@dataclass
class MinhashSettings:
    """MinHash LSH (Broder 1997; FineWeb's settings: 5-grams, 14 bands x 8 rows = 112 hashes).

    A pair with n-gram Jaccard similarity s becomes a candidate with probability 1 - (1 - s^rows)^bands; the
    S-curve's threshold, where that probability rises fastest, is about (1 / bands)^(1 / rows) = 0.72 for 14 x 8
    (Leskovec, Rajaraman, Ullman, "Mining of Massive Datasets", ch. 3.4). `threshold` sets `rows` to meet it for the
    given `bands` instead.
    """

    ngram: int = 5
    bands: int = 14
    rows: int = 8
    threshold: float | None = None
    seed: int = 1

    def __post_init__(self) -> None:
        for name in ("ngram", "bands", "rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"--minhash-{name}={getattr(self, name)} must be >= 1")
        if self.threshold is not None:
            if not 0.0 < self.threshold < 1.0:
                raise ValueError(
                    f"--minhash-threshold={self.threshold} must be in (0, 1): the Jaccard similarity above which "
                    "documents count as near-duplicates (FineWeb's 14 x 8 bands give about 0.72)"
                )
            if self.bands == 1:
                raise ValueError("--minhash-threshold needs --minhash-bands >= 2 (one band has no S-curve to place)")
            self.rows = max(1, round(math.log(1.0 / self.bands) / math.log(self.threshold)))

    @property
    def lsh_threshold(self) -> float:
        return (1.0 / self.bands) ** (1.0 / self.rows)

    def candidate_probability(self, similarity: float) -> float:
        return 1.0 - (1.0 - similarity**self.rows) ** self.bands


def _fraction(name: str, value: float | None) -> None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value} must be a fraction in [0, 1] (or unset to turn the rule off)")


@dataclass
class GopherRepetitionSettings:
    """Gopher's repetition rules (Rae et al. 2021, table A1); a fraction set to None turns its rule off."""

    dup_line_frac: float | None = 0.3
    dup_para_frac: float | None = 0.3
    dup_line_char_frac: float | None = 0.2
    dup_para_char_frac: float | None = 0.2
    top_n_grams: tuple = ((2, 0.2), (3, 0.18), (4, 0.16))
    dup_n_grams: tuple = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))

    def __post_init__(self) -> None:
        for name in ("dup_line_frac", "dup_para_frac", "dup_line_char_frac", "dup_para_char_frac"):
            _fraction(f"gopher_repetition.{name}", getattr(self, name))
        for n, frac in (*self.top_n_grams, *self.dup_n_grams):
            _fraction(f"gopher_repetition {n}-gram fraction", frac)


@dataclass
class GopherQualitySettings:
    """Gopher's quality rules (Rae et al. 2021, section A.1.1), datatrove's defaults."""

    min_doc_words: int | None = 50
    max_doc_words: int | None = 100_000
    min_avg_word_length: int | None = 3
    max_avg_word_length: int | None = 10
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    max_non_alpha_words_ratio: float | None = 0.8
    min_stop_words: int | None = 2

    def __post_init__(self) -> None:
        for name in ("max_symbol_word_ratio", "max_bullet_lines_ratio", "max_ellipsis_lines_ratio",
                     "max_non_alpha_words_ratio"):  # fmt: skip
            _fraction(f"gopher_quality.{name}", getattr(self, name))


@dataclass
class C4Settings:
    """C4's line and page rules (Raffel et al. 2020, section 2.2) as FineWeb runs them: without the terminal
    punctuation rule, which drops too many lines of ordinary web text (FineWeb's ablations)."""

    filter_no_terminal_punct: bool = False
    min_num_sentences: int = 5
    min_words_per_line: int = 3
    max_word_length: int = 1000
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True


@dataclass
class FineWebQualitySettings:
    """FineWeb's own line rules (Penedo et al. 2024, section 3.3), datatrove's defaults."""

    line_punct_thr: float = 0.12  # drop when fewer lines end in terminal punctuation
    line_punct_exclude_zero: bool = False
    short_line_thr: float = 0.67  # drop when more lines are at most short_line_length characters
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01  # drop when more characters sit in duplicated lines
    new_line_ratio: float = 0.3  # drop when there are more newlines per word (lists)

    def __post_init__(self) -> None:
        for name in ("line_punct_thr", "short_line_thr", "char_duplicates_ratio", "new_line_ratio"):
            _fraction(f"fineweb_quality.{name}", getattr(self, name))


@dataclass
class CurationConfig:
    """The curation stages to run, their settings, where eval sets for decontamination are, and how to execute."""

    stages: tuple[str, ...] = ()
    minhash: MinhashSettings = field(default_factory=MinhashSettings)
    gopher_repetition: GopherRepetitionSettings = field(default_factory=GopherRepetitionSettings)
    gopher_quality: GopherQualitySettings = field(default_factory=GopherQualitySettings)
    c4: C4Settings = field(default_factory=C4Settings)
    fineweb_quality: FineWebQualitySettings = field(default_factory=FineWebQualitySettings)
    decontaminate: list[str] = field(default_factory=list)  # eval sets: .jsonl (decontaminate_field) or .txt lines
    decontaminate_field: str = "text"
    decontaminate_ngram: int = 13  # GPT-3 (Brown et al. 2020, appendix C) and the Phi reports use 13-grams
    executor: str = "local"
    tasks: int = 1  # input shards, each processed by one task
    workers: int = 1  # local: tasks run at once
    slurm_partition: str = ""
    slurm_time: str = "01:00:00"
    slurm_cpus_per_task: int = 1
    slurm_mem_per_cpu_gb: int = 2
    examples_per_rule: int = 3

    def __post_init__(self) -> None:
        unknown = [stage for stage in self.stages if stage not in STAGES]
        if unknown:
            raise ValueError(f"curation stages {unknown} are not among {', '.join(STAGES)}")
        if self.decontaminate and "decontaminate" not in self.stages:
            self.stages = tuple(stage for stage in STAGES if stage in (*self.stages, "decontaminate"))
        if "decontaminate" in self.stages:
            if not self.decontaminate:
                raise ValueError("--curate decontaminate needs eval sets: --decontaminate PATH [PATH ...]")
            for path in self.decontaminate:
                if not Path(path).expanduser().is_file():
                    raise FileNotFoundError(
                        f"--decontaminate {path} does not exist; give the eval set's .jsonl or .txt file"
                    )
                if Path(path).suffix not in (".jsonl", ".txt"):
                    raise ValueError(f"--decontaminate {path}: use a .jsonl (field --decontaminate-field) or .txt")
        if self.decontaminate_ngram < 1:
            raise ValueError(f"--decontaminate-ngram={self.decontaminate_ngram} must be >= 1")
        if self.executor not in EXECUTORS:
            raise ValueError(f"--executor={self.executor!r} is not one of {', '.join(EXECUTORS)}")
        if self.executor == "slurm" and not self.slurm_partition:
            raise ValueError("--executor slurm needs --slurm-partition (the partition its jobs run in)")
        for name in ("tasks", "workers", "slurm_cpus_per_task", "slurm_mem_per_cpu_gb"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 1")

    def set_option(self, assignment: str) -> None:
        """Apply `--curate-option STAGE.NAME=VALUE` to a filter's settings (VALUE as JSON; null turns a rule off)."""
        target, _, raw = assignment.partition("=")
        stage, _, name = target.partition(".")
        if not raw or stage not in FILTER_SETTINGS:
            raise ValueError(
                f"--curate-option {assignment!r}: write STAGE.NAME=VALUE with STAGE one of {', '.join(FILTER_SETTINGS)}"
            )
        settings = getattr(self, stage)
        if name not in vars(settings):
            raise ValueError(
                f"--curate-option {assignment!r}: {stage} has no setting {name!r}; it has {list(vars(settings))}"
            )
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            raise ValueError(
                f"--curate-option {assignment!r}: {raw!r} is not a JSON value (true, 0.3, null, ...)"
            ) from None
        if isinstance(value, list):  # n-gram rules: [[n, fraction], ...]
            value = tuple(tuple(item) if isinstance(item, list) else item for item in value)
        setattr(self, stage, type(settings)(**{**vars(settings), name: value}))  # re-validated

    @property
    def enabled(self) -> bool:
        return bool(self.stages)

    def settings(self) -> dict:
        """What ran and with which settings, for the store header (executor details do not change the output)."""
        chosen = {"stages": list(self.stages)}
        for stage in ("minhash", *FILTER_SETTINGS):
            if stage in self.stages:
                chosen[stage] = asdict(getattr(self, stage))
        if "minhash" in self.stages:
            chosen["minhash"]["lsh_threshold"] = round(self.minhash.lsh_threshold, 4)
        if "decontaminate" in self.stages:
            chosen["decontaminate"] = {
                "eval_sets": [str(Path(path).expanduser().resolve()) for path in self.decontaminate],
                "field": self.decontaminate_field,
                "ngram": self.decontaminate_ngram,
            }
        return chosen
