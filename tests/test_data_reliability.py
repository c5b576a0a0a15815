"""Bad input files are named with the fix, in training (build_data) and in `hybridlm prepare-data`: text sources
(not UTF-8, binary, fake Parquet, bad JSON lines) and token stores (truncated, garbage, missing, changed files,
token ids beyond the vocabulary), and a store's full check runs once per store content."""

import json
import re
import shutil

import numpy as np
import pytest

from hybridlm.cli import main as cli_main
from hybridlm.data import DataConfig, build_data
from hybridlm.data import store as store_module
from hybridlm.data.store import StoreError, open_stores

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def write_corpus(directory, count=60):
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        (directory / f"doc{index:03d}.txt").write_text(f"doc {index}: " + " ".join(rng.choice(WORDS, size=30)))
    return directory


def text_config(tmp_path, paths):
    return DataConfig(source="text_files", paths=[str(p) for p in paths], vocab_size=300, val_fraction=0.25,
                      cache_dir=str(tmp_path / "cache"))


def build(cfg):
    return build_data(cfg, seq_len=16, micro_batch_size=2)


def prepare_error(tmp_path, *paths) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["prepare-data", "--source", "text_files", "--paths", *map(str, paths), "--vocab-size", "300",
                  "--val-fraction", "0.25", "--out", str(tmp_path / "prepared")])
    assert not (tmp_path / "prepared").exists()
    return exit_info.value.code


# --- text sources --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, content, message", [
    ("latin1.txt", "caf\xe9 au lait".encode("latin-1"),
     r"latin1.txt is not UTF-8 text \(invalid continuation byte at byte 3\); convert it to UTF-8"),
    ("image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", r"image.txt holds NUL bytes .* looks like a binary file"),
    ("fake.parquet", b"this is no parquet file, only text\n" * 4, r"fake.parquet is not a Parquet file \("),
    ("lines.jsonl", b'{"text": "fine"}\n{"text": "ok"}\n{"text": "caf\xe9"}\n', r"lines.jsonl:3 is not UTF-8 text"),
    ("json.jsonl", b'{"text": "fine"}\n\n{"text": oops}\n', r"json.jsonl:3 is not valid JSON .*fix or remove that line"),
], ids=["not-utf8", "binary", "fake-parquet", "jsonl-bad-bytes", "jsonl-bad-json"])
def test_a_bad_file_among_good_ones_is_named_in_training_and_prepare_data(tmp_path, name, content, message):
    corpus = write_corpus(tmp_path / "corpus")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / name).write_bytes(content)
    paths = [corpus / "*.txt", tmp_path / "bad" / name]
    with pytest.raises(ValueError, match=message) as error:
        build(text_config(tmp_path, paths))
    assert str(tmp_path / "bad" / name) in str(error.value)
    code = prepare_error(tmp_path, *paths)
    assert code.startswith("hybridlm prepare-data: ") and re.search(message, code), code


# --- token stores --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    corpus = write_corpus(root / "corpus")
    assert cli_main(["prepare-data", "--source", "text_files", "--paths", str(corpus / "*.txt"), "--vocab-size",
                     "300", "--val-fraction", "0.25", "--out", str(root / "store")]) == 0
    return root / "store"


@pytest.fixture
def store(prepared, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(prepared, copy)
    return copy


def memmap_config(tmp_path, store):
    return DataConfig(source="memmap", paths=[str(store)], val_fraction=0.25, cache_dir=str(tmp_path / "cache"))


def damage(store, case):
    header = json.loads((store / "header.json").read_text())
    tokens = store / header["splits"]["train"]["shards"][0]["tokens"]
    size = tokens.stat().st_size
    if case == "truncated-bin":
        tokens.write_bytes(tokens.read_bytes()[: size // 2])
    elif case == "garbage-idx":
        (store / "train-00000.idx.npy").write_bytes(b"\x00garbage" * 10)
    elif case == "garbage-header":
        (store / "header.json").write_text('{"format": "hybridlm-token-store", "vers')
    elif case == "missing-tokenizer":
        (store / "tokenizer.json").unlink()
    elif case == "random-bin":
        tokens.write_bytes(np.random.default_rng(0).bytes(size))
    elif case == "half-zeroed-bin":
        tokens.write_bytes(tokens.read_bytes()[: size // 2] + bytes(size - size // 2))
    return tokens


@pytest.mark.parametrize("case, message", [
    ("truncated-bin", r"train-00000.bin has \d+ bytes, header.json says \d+ \(\d+ tokens of uint16\)"),
    ("garbage-idx", r"train-00000.idx.npy is not a readable .npy array"),
    ("garbage-header", r"header.json is not valid JSON"),
    ("missing-tokenizer", r"tokenizer.json is missing"),
    ("random-bin", r"train-00000.bin: its sha256 differs from header.json's checksum"),
    ("half-zeroed-bin", r"train-00000.bin: its sha256 differs from header.json's checksum"),
])
def test_a_damaged_store_is_refused_naming_the_file(tmp_path, store, case, message):
    damage(store, case)
    with pytest.raises(StoreError, match=message + r".*re-run `hybridlm prepare-data`") as error:
        build(memmap_config(tmp_path, store))
    assert str(store) in str(error.value)


def test_token_ids_beyond_the_vocabulary_are_refused_in_a_store_without_checksums(tmp_path, store):
    """A version 1 store (no checksums): random bytes of the right size are still caught, by the token-id range,
    before a forward could index the embedding with them."""
    header = json.loads((store / "header.json").read_text())
    del header["checksums"]
    header["version"] = 1
    (store / "header.json").write_text(json.dumps(header))
    damage(store, "random-bin")
    with pytest.raises(StoreError, match=r"train-00000.bin holds token id \d+, beyond the vocabulary \(vocab_size "
                                         r"300\)"):
        build(memmap_config(tmp_path, store))


def test_the_full_check_runs_once_per_store_content(tmp_path, store, monkeypatch):
    scans = []
    scan = store_module._scan_tokens
    monkeypatch.setattr(store_module, "_scan_tokens", lambda path, dtype: scans.append(path.name) or scan(path, dtype))
    verified = tmp_path / "verified"
    open_stores([store], verified_dir=verified)
    assert scans == ["train-00000.bin", "val-00000.bin"]
    open_stores([store], verified_dir=verified)
    assert len(scans) == 2  # stamped: only the cheap checks ran
    open_stores([store])
    assert len(scans) == 4  # no stamp directory: the full pass every time
    damage(store, "half-zeroed-bin")  # same size; its mtime changes, and with it the stamp's key
    with pytest.raises(StoreError, match="sha256 differs"):
        open_stores([store], verified_dir=verified)
    # Opted out (a store too big to read at every new start): the cheap checks only.
    cfg = memmap_config(tmp_path, store)
    cfg.verify_store_contents = False
    assert build(cfg).train is not None and len(scans) == 5
    damage(store, "truncated-bin")
    with pytest.raises(StoreError, match="train-00000.bin has"):
        build(cfg)
