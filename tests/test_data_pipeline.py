"""End-to-end data pipeline on small files: sources, tokenizer cache, token stores, prepare-data, errors."""

import argparse
import json
import math
import subprocess
import sys
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hybridlm.data import DataConfig, MQARConfig, build_data
from hybridlm.data.cli import add_prepare_data_parser, run_prepare_data
from hybridlm.data.sources import (
    is_generated_module,
    is_validation_document,
    iter_documents,
    source_files,
    stdlib_files,
)
from hybridlm.data.store import cached_text_store, open_stores
from hybridlm.loss import IGNORE_INDEX

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def make_documents(count, seed=0):
    rng = np.random.default_rng(seed)
    return [f"doc {i}: " + " ".join(rng.choice(WORDS, size=rng.integers(5, 60))) + ".\n" for i in range(count)]


@pytest.fixture(scope="module")
def documents():
    return make_documents(80)


@pytest.fixture
def jsonl_path(tmp_path, documents):
    path = tmp_path / "corpus" / "part.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps({"text": text, "id": i}) + "\n" for i, text in enumerate(documents)))
    return path


def text_config(tmp_path, paths, **overrides):
    settings = dict(source="text_files", paths=[str(p) for p in paths], vocab_size=300, val_fraction=0.25,
                    cache_dir=str(tmp_path / "cache"))
    settings.update(overrides)
    return DataConfig(**settings)


def prepare(out, *args):
    parser = argparse.ArgumentParser()
    add_prepare_data_parser(parser.add_subparsers())
    return run_prepare_data(parser.parse_args(["prepare-data", "--out", str(out), *args]))


def decoded(tokenizer, document_set):
    return [tokenizer.decode(document_set.document(i)) for i in range(document_set.num_documents)]


def test_txt_jsonl_parquet_give_the_same_documents(tmp_path, documents, jsonl_path):
    txt_dir = tmp_path / "txt"
    txt_dir.mkdir()
    for i, text in enumerate(documents):
        (txt_dir / f"doc_{i:03d}.txt").write_text(text)
    pq.write_table(pa.table({"body": documents}), tmp_path / "corpus.parquet", row_group_size=16)
    for cfg in (
        text_config(tmp_path, [jsonl_path]),
        text_config(tmp_path, [txt_dir / "*.txt"]),
        text_config(tmp_path, [tmp_path / "corpus.parquet"], text_field="body"),
    ):
        assert list(iter_documents(cfg, source_files(cfg))) == documents
    capped = text_config(tmp_path, [jsonl_path], max_documents=7)
    assert list(iter_documents(capped, source_files(capped))) == documents[:7]


def test_split_is_by_document_hash_and_round_trips(tmp_path, documents, jsonl_path):
    cfg = text_config(tmp_path, [jsonl_path])
    store = open_stores([cached_text_store(cfg, tmp_path / "cache")])
    train, val = decoded(store.tokenizer, store.train), decoded(store.tokenizer, store.val)
    assert sorted(train + val) == sorted(documents)  # byte-level BPE decodes exactly
    assert not set(train) & set(val) and len(val) > 0
    assert all(is_validation_document(text, 0.25) for text in val)
    assert not any(is_validation_document(text, 0.25) for text in train)
    assert train == [text for text in documents if text in set(train)]  # source order is kept in the store


def test_build_data_batches_and_unigram_baseline(tmp_path, jsonl_path):
    cfg = text_config(tmp_path, [jsonl_path])
    bundle = build_data(cfg, seq_len=32, micro_batch_size=3, model_vocab_size=300)
    assert bundle.vocab_size == len(bundle.tokenizer) <= 300
    eos = bundle.tokenizer.eos_token_id
    assert bundle.tokenizer.pad_token_id == eos and bundle.tokenizer.decode([eos]) == "<|endoftext|>"
    batch = next(bundle.train)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (3, 32)
    inputs, labels = batch["input_ids"].reshape(-1), batch["labels"].reshape(-1)
    inside_rows = torch.arange(95) % 32 != 31
    has_target = labels[:-1] != IGNORE_INDEX
    assert torch.equal(labels[:-1][has_target & inside_rows], inputs[1:][has_target & inside_rows])
    assert (labels[inputs == eos] == IGNORE_INDEX).all()
    # Unigram baseline, recomputed from the stored documents: targets are tokens[1:] + EOS of every document.
    store = open_stores([cached_text_store(cfg, tmp_path / "cache")])

    def targets(document_set):
        counts = Counter()
        for i in range(document_set.num_documents):
            counts.update(document_set.document(i)[1:].tolist() + [eos])
        return counts

    train_counts, val_counts = targets(store.train), targets(store.val)
    total = sum(train_counts.values())
    expected = -sum(n * math.log((train_counts[t] + 1) / (total + bundle.vocab_size)) for t, n in val_counts.items())
    assert bundle.unigram_loss == pytest.approx(expected / sum(val_counts.values()), rel=1e-9)
    # The same unigram, to score the targets of the batches the trainer validates on.
    log_probs = [math.log((train_counts[t] + 1) / (total + bundle.vocab_size)) for t in range(bundle.vocab_size)]
    assert torch.allclose(bundle.unigram_log_probs, torch.tensor(log_probs, dtype=torch.float64), rtol=1e-12)
    val = list(bundle.val_batches())
    assert len(val) == bundle.stats["val_batches"] > 3
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(val, bundle.val_batches()))
    # A few batches are spread over the whole split (first to last), not its first documents only.
    picked = bundle.val_batches.indices(3)
    assert picked[0] == 0 and picked[-1] == len(val) - 1 and len(set(picked)) == 3
    spread = list(bundle.val_batches(3))
    assert len(spread) == 3 and all(torch.equal(b["labels"], val[i]["labels"]) for b, i in zip(spread, picked))


def test_a_validation_split_below_min_val_tokens_fails_naming_the_fix(tmp_path, jsonl_path):
    cfg = text_config(tmp_path, [jsonl_path], min_val_tokens=10**6)
    with pytest.raises(ValueError, match=r"fewer than data.min_val_tokens=1000000; raise data.val_fraction=0.25"):
        build_data(cfg, seq_len=16, micro_batch_size=2)


def test_second_build_reads_the_cache(tmp_path, jsonl_path, monkeypatch):
    cfg = text_config(tmp_path, [jsonl_path])
    first = build_data(cfg, seq_len=16, micro_batch_size=2)
    import hybridlm.data.store as store_module

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(store_module, "write_text_store", no_rebuild)
    second = build_data(cfg, seq_len=16, micro_batch_size=2)
    assert torch.equal(next(first.train)["input_ids"], next(second.train)["input_ids"])
    # Changing the data invalidates the key.
    jsonl_path.write_text(jsonl_path.read_text() + json.dumps({"text": "one more document"}) + "\n")
    with pytest.raises(AssertionError, match="cache should have been used"):
        build_data(cfg, seq_len=16, micro_batch_size=2)


def test_concurrent_processes_build_the_cache_once(tmp_path, jsonl_path):
    script = (
        "import sys; from hybridlm.data import DataConfig, build_data; "
        f"cfg = DataConfig(source='text_files', paths=[{str(jsonl_path)!r}], vocab_size=300, val_fraction=0.25, "
        f"cache_dir={str(tmp_path / 'cache')!r}); "
        "b = build_data(cfg, seq_len=16, micro_batch_size=2); print(next(b.train)['input_ids'].sum().item())"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    assert outputs[0] == outputs[1]
    entries = sorted(path.name for path in (tmp_path / "cache" / "tokens").iterdir())
    assert len(entries) == 2 and entries[0] + ".lock" == entries[1]  # one store, its lock, no temp dirs


def test_prepare_data_then_memmap_matches_text_files(tmp_path, jsonl_path):
    out = tmp_path / "prepared"
    header = prepare(out, "--source", "text_files", "--paths", str(jsonl_path), "--vocab-size", "300",
                     "--val-fraction", "0.25", "--shard-tokens", "200")
    assert len(header["splits"]["train"]["shards"]) > 1
    assert (out / "tokenizer.json").is_file() and header["dtype"] == "uint16"
    memmap_cfg = DataConfig(source="memmap", paths=[str(out)], val_fraction=0.25)
    memmap = build_data(memmap_cfg, seq_len=24, micro_batch_size=2)
    text = build_data(text_config(tmp_path, [jsonl_path]), seq_len=24, micro_batch_size=2)
    for _ in range(5):
        want, got = next(text.train), next(memmap.train)
        assert all(torch.equal(want[key], got[key]) for key in want)
    assert memmap.unigram_loss == text.unigram_loss
    store = open_stores([out])
    assert all(isinstance(tokens, np.memmap) for tokens in store.train._tokens)
    with pytest.raises(FileExistsError, match="already exists"):
        prepare(out, "--source", "stdlib")


def test_memmap_reads_several_stores_with_one_tokenizer(tmp_path, documents):
    halves = []
    for half, texts in enumerate((documents[:40], documents[40:])):
        path = tmp_path / f"half{half}.jsonl"
        path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
        halves.append(path)
    first, second, foreign = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    prepare(first, "--source", "text_files", "--paths", str(halves[0]), "--vocab-size", "300", "--val-fraction", "0.25")
    prepare(second, "--source", "text_files", "--paths", str(halves[1]), "--tokenizer", str(first),
            "--val-fraction", "0.25")
    store = open_stores([first, second])
    assert sorted(decoded(store.tokenizer, store.train) + decoded(store.tokenizer, store.val)) == sorted(documents)
    prepare(foreign, "--source", "text_files", "--paths", str(halves[1]), "--vocab-size", "280",
            "--val-fraction", "0.25")
    with pytest.raises(ValueError, match="different tokenizers"):
        build_data(DataConfig(source="memmap", paths=[str(first), str(foreign)], val_fraction=0.25),
                   seq_len=8, micro_batch_size=1)
    with pytest.raises(ValueError, match="val_fraction=0.02 but .* was split with val_fraction=0.25"):
        build_data(DataConfig(source="memmap", paths=[str(first)]), seq_len=8, micro_batch_size=1)
    with pytest.raises(ValueError, match="model's vocab_size is 100"):
        build_data(DataConfig(source="memmap", paths=[str(first)], val_fraction=0.25), seq_len=8,
                   micro_batch_size=1, model_vocab_size=100)


def test_user_tokenizer_file(tmp_path, jsonl_path):
    out = tmp_path / "prepared"
    prepare(out, "--source", "text_files", "--paths", str(jsonl_path), "--vocab-size", "290", "--val-fraction", "0.25")
    cfg = text_config(tmp_path, [jsonl_path], tokenizer=str(out / "tokenizer.json"))
    bundle = build_data(cfg, seq_len=16, micro_batch_size=2)
    assert bundle.vocab_size == 290 and bundle.tokenizer.eos_token == "<|endoftext|>"
    with pytest.raises(ValueError, match="model's vocab_size is 200"):
        build_data(cfg, seq_len=16, micro_batch_size=2, model_vocab_size=200)
    with pytest.raises(FileNotFoundError, match="neither 'bpe' nor an existing"):
        build_data(text_config(tmp_path, [jsonl_path], tokenizer=str(tmp_path / "nope.json")), seq_len=16,
                   micro_batch_size=2)


def test_stdlib_source_on_a_capped_subset(tmp_path):
    cfg = DataConfig(max_documents=40, vocab_size=512, val_fraction=0.3, cache_dir=str(tmp_path / "cache"))
    bundle = build_data(cfg, seq_len=64, micro_batch_size=2, world_size=2, rank=1)
    assert bundle.vocab_size == 512 and bundle.stats["train_documents"] + bundle.stats["val_documents"] == 40
    assert 0 < bundle.unigram_loss < math.log(512)
    files = stdlib_files()
    assert files and all("site-packages" not in file.parts for file in files)
    store = open_stores([cached_text_store(cfg, tmp_path / "cache")])
    sampled = list(iter_documents(cfg, files))
    assert sorted(decoded(store.tokenizer, store.train) + decoded(store.tokenizer, store.val)) == sorted(sampled)


def test_stdlib_cap_is_a_hash_sample_over_all_files_without_generated_modules():
    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    path_of = {}
    for file in files:
        try:
            path_of.setdefault(file.read_bytes().decode("utf-8"), file.relative_to(root))
        except UnicodeDecodeError:
            pass
    sampled = list(iter_documents(DataConfig(max_documents=200), files))
    assert len(sampled) == 200 and sampled == list(iter_documents(DataConfig(max_documents=200), files))
    chosen = [path_of[text] for text in sampled]
    # Spread over the whole library, not the first 200 files in path order (~12 % of them are expected there).
    first_in_order = set(sorted(path_of.values(), key=lambda path: path.as_posix())[:200])
    assert len(first_in_order.intersection(chosen)) < 60
    assert sum(path.as_posix() >= "m" for path in chosen) > 50
    everything = {path_of[text] for text in iter_documents(DataConfig(), files)}  # no cap
    tables = {Path("encodings", name) for name in ("cp437.py", "cp1252.py", "mac_roman.py", "iso8859_15.py")}
    assert tables <= set(path_of.values()) and not tables & everything  # charmap codec tables are left out
    # A larger cap keeps every document of a smaller one (the lowest hashes stay the lowest).
    assert set(sampled) <= set(iter_documents(DataConfig(max_documents=400), files))


@pytest.mark.parametrize(
    "module, generated",
    [("encodings/cp437.py", True), ("pydoc_data/topics.py", True), ("stringprep.py", True),
     ("ast.py", False), ("_compat_pickle.py", False), ("lib2to3/pgen2/parse.py", False), ("os.py", False)],
)  # fmt: skip
def test_generated_stdlib_modules_are_recognised_by_their_header(module, generated):
    path = Path(sysconfig.get_paths()["stdlib"]) / module
    if not path.is_file():
        pytest.skip(f"{module} is not in this Python's standard library")
    assert is_generated_module(path, path.read_text(encoding="utf-8")) is generated


def test_mqar_bundle(tmp_path):
    cfg = DataConfig(source="mqar", mqar=MQARConfig(num_kv_pairs=8, vocab_size=64, num_examples=256,
                                                    num_val_examples=32))
    bundle = build_data(cfg, seq_len=40, micro_batch_size=4)
    num_values = 64 - 1 - cfg.mqar.keys
    assert bundle.vocab_size == len(bundle.tokenizer) == 64
    assert abs(bundle.unigram_loss - math.log(num_values)) < 0.3
    batch = next(bundle.train)
    labelled = batch["labels"] != IGNORE_INDEX
    assert labelled.sum(dim=1).tolist() == [8] * 4
    assert (labelled[:, :16] == 0).all() and (batch["labels"][labelled] > cfg.mqar.keys).all()
    assert batch["cu_seqlens"].tolist() == [0, 40, 80, 120, 160]
    assert bundle.tokenizer.decode(batch["input_ids"][0, :2]).split()[0].startswith("k")
    state = bundle.train.state_dict()
    expected = [next(bundle.train)["input_ids"] for _ in range(80)]  # crosses epochs (64 batches per epoch)
    again = build_data(cfg, seq_len=40, micro_batch_size=4)
    again.train.load_state_dict(state)
    assert all(torch.equal(want, next(again.train)["input_ids"]) for want in expected)
    assert len(list(bundle.val_batches())) == 8
    with pytest.raises(ValueError, match="need 32 tokens .* seq_len=16"):
        build_data(cfg, seq_len=16, micro_batch_size=4)
    with pytest.raises(ValueError, match="model's vocab_size is 32"):
        build_data(cfg, seq_len=40, micro_batch_size=4, model_vocab_size=32)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        build_data(cfg, seq_len=40, micro_batch_size=8, world_size=8)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(source="web"), "data.source='web' is not one of"),
        (dict(source="text_files"), "needs data.paths"),
        (dict(source="memmap"), "needs data.paths"),
        (dict(paths=["x.txt"]), "not used by data.source=stdlib"),
        (dict(vocab_size=100), "data.vocab_size=100 must be >= 257"),
        (dict(val_fraction=0.0), "data.val_fraction=0.0 must be in"),
        (dict(val_fraction=1.0), "data.val_fraction=1.0 must be in"),
        (dict(max_documents=-1), "data.max_documents=-1"),
        (dict(text_field=""), "data.text_field is empty"),
        (dict(tokenizer=""), "data.tokenizer is empty"),
        (dict(tokenizer_train_chars=0), "data.tokenizer_train_chars=0"),
        (dict(mqar=dict(num_kv_pairs=0)), "data.mqar.num_kv_pairs=0"),
        (dict(mqar=dict(num_queries=-1)), "data.mqar.num_queries=-1"),
        (dict(mqar=dict(num_kv_pairs=4, num_queries=5)), "num_queries=5 exceeds num_kv_pairs=4"),
        (dict(mqar=dict(num_kv_pairs=200, vocab_size=256)), "cannot give num_kv_pairs=200"),
        (dict(mqar=dict(num_keys=255, vocab_size=256)), "leaves no value tokens"),
    ],
)
def test_config_errors(settings, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**settings)


def test_source_file_errors(tmp_path, jsonl_path):
    def build(paths, **overrides):
        build_data(text_config(tmp_path, paths, **overrides), seq_len=16, micro_batch_size=2)

    with pytest.raises(FileNotFoundError, match="matches no file"):
        build([tmp_path / "missing" / "*.jsonl"])
    with pytest.raises(ValueError, match="matches the directory"):
        build([jsonl_path.parent])
    (tmp_path / "notes.md").write_text("hi")
    with pytest.raises(ValueError, match=r"not one of \.txt, \.jsonl, \.parquet"):
        build([tmp_path / "notes.md"])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        build([tmp_path / "empty.txt"])
    with pytest.raises(ValueError, match=r"part.jsonl:1 has no field data.text_field='body'; it has \['text', 'id'\]"):
        build([jsonl_path], text_field="body")
    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"no column data.text_field='text'; its columns are \['content'\]"):
        build([tmp_path / "t.parquet"])
    broken = tmp_path / "broken.jsonl"
    broken.write_text(jsonl_path.read_text() + "{not json\n")
    with pytest.raises(ValueError, match=r"broken.jsonl:81 is not valid JSON"):
        build([broken])
    with pytest.raises(ValueError, match="no val documents"):
        build([jsonl_path], max_documents=1, val_fraction=0.01)
    with pytest.raises(ValueError, match="data.vocab_size=300 BPE has 300 tokens but the model's vocab_size is 256"):
        build_data(text_config(tmp_path, [jsonl_path]), seq_len=16, micro_batch_size=2, model_vocab_size=256)
    with pytest.raises(FileNotFoundError, match="is not a token store"):
        build_data(DataConfig(source="memmap", paths=[str(tmp_path)]), seq_len=16, micro_batch_size=2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(seq_len=1, micro_batch_size=2), "seq_len=1"),
        (dict(seq_len=8, micro_batch_size=0), "micro_batch_size=0"),
        (dict(seq_len=8, micro_batch_size=1, rank=2, world_size=2), r"rank=2 must be in \[0, world_size=2\)"),
    ],
)
def test_build_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_data(DataConfig(source="mqar"), **kwargs)


def test_hydra_structured_config_round_trip():
    from omegaconf import OmegaConf

    schema = OmegaConf.structured(DataConfig)
    merged = OmegaConf.merge(schema, OmegaConf.from_dotlist(["source=mqar", "mqar.num_kv_pairs=8", "pack=false"]))
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, DataConfig) and isinstance(cfg.mqar, MQARConfig)
    assert cfg.mqar.num_kv_pairs == 8 and cfg.pack is False
    with pytest.raises(ValueError, match="data.val_fraction=2.0"):
        OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.from_dotlist(["val_fraction=2"])))
