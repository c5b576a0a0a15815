"""`prepare-data --curate` on generated corpora: exact and MinHash dedup rates, quality filters, decontamination,
the report, resume after an interruption, bad input, and training on the curated store.

Measured on this corpus (200-word documents, default MinHash 5-grams x 14 bands x 8 rows, LSH threshold 0.72):
see MEASURED below; the test asserts the issue's bounds (>= 95% of 1-2% near-duplicates, <= 1% of unique documents).
"""

from __future__ import annotations

import gzip
import json
import random
import sys
from pathlib import Path

import pytest

pytest.importorskip("datatrove")

from hybridlm.cli import main  # noqa: E402
from hybridlm.data.config import DataConfig  # noqa: E402
from hybridlm.data.curation import CurationConfig, MinhashSettings  # noqa: E402
from hybridlm.data.store import read_header, write_text_store  # noqa: E402

from helpers.launch import TINY_MODEL, read_metrics, train  # noqa: E402
from helpers.slurm_cluster import start_test_cluster  # noqa: E402

STOP_WORDS = ["the", "be", "to", "of", "and", "that", "have", "with", "in", "a", "is", "for", "on", "it"]
WORDS_PER_DOCUMENT = 200


def _vocabulary(rng: random.Random, size: int = 4000) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(size)]


def prose(rng: random.Random, vocabulary: list[str], words: int = WORDS_PER_DOCUMENT) -> list[str]:
    """Random words, a stop word every few, as a word list (sentences and lines are added by `as_text`)."""
    return [rng.choice(STOP_WORDS) if rng.random() < 0.3 else rng.choice(vocabulary) for _ in range(words)]


def as_text(words: list[str]) -> str:
    """Sentences of 10 words on lines of two sentences: passes Gopher's and C4's rules as ordinary prose does."""
    sentences = [" ".join(words[i : i + 10]).capitalize() + "." for i in range(0, len(words), 10)]
    return "\n".join(" ".join(sentences[i : i + 2]) for i in range(0, len(sentences), 2))


def near_duplicate(rng: random.Random, words: list[str], vocabulary: list[str], fraction: float) -> list[str]:
    copy = list(words)
    for index in rng.sample(range(len(copy)), max(1, round(fraction * len(copy)))):
        copy[index] = rng.choice(vocabulary)
    return copy


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def removed_keys(store: Path, stage: str, records: list[dict]) -> list[str]:
    """The `key` of every record that `stage` removed (found by its text, which curation keeps as it is)."""
    key_of = {record["text"]: record["key"] for record in records}
    keys = []
    for path in sorted((store / "curation" / "removed" / stage).glob("*.jsonl.gz")):
        with gzip.open(path, "rt") as handle:
            keys += [key_of[json.loads(line)["text"]] for line in handle]
    return keys


def curate(tmp_path: Path, records: list[dict], curation: CurationConfig, name: str = "store") -> tuple[Path, dict]:
    corpus = write_jsonl(tmp_path / f"{name}.jsonl", records)
    cfg = DataConfig(source="text_files", paths=[str(corpus)], vocab_size=300, val_fraction=0.1)
    out = tmp_path / name
    return out, write_text_store(cfg, out, curation=curation)


@pytest.fixture(scope="module")
def dedup_corpus() -> tuple[list[dict], dict]:
    """Unique documents, exact copies (layout changed), and near-duplicates at 1-2%, 5% and 10% of words replaced;
    each record's `key` names its role (the pipeline reads only `text`)."""
    rng = random.Random(0)
    vocabulary = _vocabulary(rng)
    originals = [prose(rng, vocabulary) for _ in range(500)]
    records = [{"text": as_text(words), "key": f"unique-{i}"} for i, words in enumerate(originals)]
    plan = {"exact": range(0, 40), "near-0.01": range(40, 90), "near-0.02": range(90, 140),
            "near-0.05": range(140, 190), "near-0.10": range(190, 240)}  # fmt: skip
    for kind, indices in plan.items():
        for i in indices:
            if kind == "exact":
                text = as_text(originals[i]).replace("\n", "\n\n  ")  # same words, other whitespace
            else:
                text = as_text(near_duplicate(rng, originals[i], vocabulary, float(kind.split("-")[1])))
            records.append({"text": text, "key": f"{kind}-{i}"})
    rng.shuffle(records)
    return records, plan


def test_exact_and_minhash_dedup_rates(tmp_path, dedup_corpus):
    records, plan = dedup_corpus
    store, header = curate(tmp_path, records, CurationConfig(stages=("exact", "minhash")))
    exact, minhash = removed_keys(store, "exact", records), removed_keys(store, "minhash", records)

    def pairs_removed(kind: str, removed: list[str]) -> float:
        """Share of (original, copy) pairs of which exactly one is gone (either may be the one kept)."""
        hits = [(f"unique-{i}" in removed) + (f"{kind}-{i}" in removed) for i in plan[kind]]
        assert max(hits) <= 1, f"{kind}: both members of a pair removed"
        return sum(hits) / len(hits)

    assert pairs_removed("exact", exact) == 1.0
    assert len(exact) == len(plan["exact"])
    rates = {kind: pairs_removed(kind, minhash) for kind in plan if kind != "exact"}
    partnered = {f"unique-{i}" for indices in plan.values() for i in indices}
    lone_removed = [key for key in minhash if key.startswith("unique-") and key not in partnered]
    lone_rate = len(lone_removed) / (500 - len(partnered))
    near_1_2 = (rates["near-0.01"] + rates["near-0.02"]) / 2
    print("MEASURED minhash removal:", rates, "unique documents removed:", lone_rate)
    assert near_1_2 >= 0.95
    assert lone_rate <= 0.01
    # The 14 x 8 bands place the S-curve at s = 0.72: 5% of words replaced gives 5-gram Jaccard ~0.6, 10% ~0.4, so
    # MinHash is expected to miss most of those (FineWeb's trade-off: few false positives).
    assert rates["near-0.10"] <= rates["near-0.05"] <= near_1_2
    assert rates["near-0.10"] < 0.5

    report = json.loads((store / "curation" / "report.json").read_text())
    stages = {entry["stage"]: entry for entry in report["stages"]}
    assert stages["exact"]["documents_in"] == len(records)
    assert stages["exact"]["documents_out"] == len(records) - len(exact)
    assert stages["minhash"]["documents_out"] == len(records) - len(exact) - len(minhash)
    assert stages["exact"]["cluster_sizes"] == {"2": len(plan["exact"])}
    assert sum(int(size) * count for size, count in stages["minhash"]["cluster_sizes"].items()) >= 2 * len(minhash)
    assert stages["minhash"]["tokens_removed"] > 0
    # Tokens per stage, counted back from the store, add up to the input's tokens under the store's tokenizer.
    from hybridlm.data.tokenizer import encode_documents, load_tokenizer

    input_tokens = sum(len(ids) for ids in encode_documents(load_tokenizer(str(store)), [r["text"] for r in records]))
    assert report["input"]["tokens"] == stages["exact"]["tokens_in"] == input_tokens
    assert stages["exact"]["tokens_out"] == stages["minhash"]["tokens_in"]
    train_tokens = header["splits"]["train"]["num_tokens"] + header["splits"]["val"]["num_tokens"]
    assert stages["minhash"]["tokens_out"] == report["output"]["tokens"] == train_tokens
    assert (store / "curation" / "funnel.png").stat().st_size > 0
    assert header["curation"]["stages"] == ["exact", "minhash"]
    assert header["curation"]["minhash"]["lsh_threshold"] == pytest.approx(0.7192, abs=1e-3)
    kept = header["splits"]["train"]["num_documents"] + header["splits"]["val"]["num_documents"]
    assert kept == report["output"]["documents"] == len(records) - len(exact) - len(minhash)


def python_sources(count: int) -> list[str]:
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = ["textwrap.py", "bisect.py", "colorsys.py", "keyword.py", "fnmatch.py", "glob.py", "shlex.py",
             "heapq.py", "queue.py", "sched.py"]  # fmt: skip
    return [(root / name).read_text() for name in files[:count]]


def test_quality_filters_remove_planted_junk_and_keep_prose_and_code(tmp_path):
    rng = random.Random(1)
    vocabulary = _vocabulary(rng)
    good = [{"text": as_text(prose(rng, vocabulary)), "key": f"prose-{i}"} for i in range(30)]
    good += [{"text": text, "key": f"code-{i}"} for i, text in enumerate(python_sources(10))]
    trimmed = [{"text": as_text(prose(rng, vocabulary)) + "\nRead more", "key": f"trimmed-{i}"} for i in range(3)]
    good += trimmed
    junk = []
    for i in range(5):
        banner = f"Subscribe to our newsletter for the best deals number {i} today!"
        junk.append({"text": "\n".join([banner] * 25 + [as_text(prose(rng, vocabulary, 30))]), "key": f"repeated-{i}"})
        junk.append({"text": " ".join(rng.choice(["#", "###", "$$", "&&&", "#tag"]) + " " + rng.choice(vocabulary)
                                      for _ in range(80)), "key": f"symbols-{i}"})  # fmt: skip
        junk.append({"text": f"Menu\nHome\nLogin\nCart {i}\n" + "Click here.\n" * 3, "key": f"boilerplate-{i}"})
        junk.append({"text": as_text(prose(rng, vocabulary, 120)) + "\nLorem ipsum dolor sit amet, consectetur.",
                     "key": f"lorem-{i}"})  # fmt: skip
        # A list of short unpunctuated lines: passes Gopher and C4, fails FineWeb's line-punctuation rule
        short = [word for word in vocabulary if len(word) <= 5]
        lines = (f"the {rng.choice(short)} of {rng.choice(short)} {rng.choice(short)}" for _ in range(40))
        junk.append({"text": "\n".join(lines), "key": f"list-{i}"})
    records = good + junk
    rng.shuffle(records)
    stages = ("gopher_repetition", "gopher_quality", "c4", "fineweb_quality")
    store, _ = curate(tmp_path, records, CurationConfig(stages=stages))
    removed = {key for stage in stages for key in removed_keys(store, stage, records)}
    junk_keys = {record["key"] for record in junk}
    print(f"MEASURED quality filters: {len(removed & junk_keys)}/{len(junk_keys)} planted junk removed, "
          f"{len(removed - junk_keys)}/{len(good)} good documents removed")  # 25/25 and 0/43
    assert removed == junk_keys, (sorted(junk_keys - removed), sorted(removed - junk_keys))
    report = json.loads((store / "curation" / "report.json").read_text())
    rules = {rule for entry in report["stages"] for rule in entry["removed_by_rule"]}
    assert {"dup_line_frac", "lorem_ipsum", "line_punct_ratio"} <= rules
    assert sorted(removed_keys(store, "fineweb_quality", records)) == [f"list-{i}" for i in range(5)]
    assert all(len(examples) <= 3 for entry in report["stages"] for examples in entry["examples"].values())
    assert report["stages"][0]["code_documents_passed"] == 10
    # C4 cut the 2-word line from the trimmed documents; removed/c4_trimmed keeps them as they were.
    c4 = report["stages"][2]
    assert c4["documents_trimmed"] == 3 and c4["tokens_trimmed"] > 0
    assert sorted(removed_keys(store, "c4_trimmed", records)) == [record["key"] for record in trimmed]
    assert c4["tokens_in"] == c4["tokens_out"] + c4["tokens_removed"] + c4["tokens_trimmed"]

    # Each rule is configurable: with C4's lorem-ipsum rule off (and the others as before) those pages stay.
    curation = CurationConfig(stages=stages)
    curation.set_option("c4.filter_lorem_ipsum=false")
    store, header = curate(tmp_path, records, curation, name="lorem_kept")
    removed = {key for stage in stages for key in removed_keys(store, stage, records)}
    assert removed == {key for key in junk_keys if not key.startswith("lorem-")}
    assert header["curation"]["c4"]["filter_lorem_ipsum"] is False


def test_decontamination_removes_eval_overlap_and_keeps_neighbours(tmp_path):
    rng = random.Random(2)
    vocabulary = _vocabulary(rng)
    passages = [prose(rng, vocabulary, 40) for _ in range(3)]
    eval_set = write_jsonl(tmp_path / "eval.jsonl", [{"question": " ".join(words)} for words in passages])
    records = [{"text": as_text(prose(rng, vocabulary)), "key": f"clean-{i}"} for i in range(20)]
    for i, words in enumerate(passages):
        body = prose(rng, vocabulary)
        records.append({"text": as_text(body[:100] + words[5:18] + body[100:]), "key": f"contaminated-{i}"})
        # 12 consecutive words of the passage: one short of the 13-gram window
        records.append({"text": as_text(body[:100] + words[5:17] + body[100:]), "key": f"neighbour-{i}"})
    store, header = curate(tmp_path, records, CurationConfig(stages=("decontaminate",), decontaminate=[str(eval_set)],
                                                             decontaminate_field="question"))  # fmt: skip
    assert sorted(removed_keys(store, "decontaminate", records)) == [f"contaminated-{i}" for i in range(3)]
    entry = json.loads((store / "curation" / "report.json").read_text())["stages"][0]
    assert entry["eval_items_matched"] == {f"eval.jsonl:{i + 1}": 1 for i in range(3)}
    assert header["curation"]["decontaminate"]["ngram"] == 13


def test_curated_store_trains_with_memmap(tmp_path, dedup_corpus):
    records, _ = dedup_corpus
    corpus = write_jsonl(tmp_path / "corpus.jsonl", records[:300])
    out = tmp_path / "curated"
    assert main(["prepare-data", "--source", "text_files", "--paths", str(corpus), "--vocab-size", "512",
                 "--val-fraction", "0.1", "--curate", "default", "--out", str(out)]) == 0  # fmt: skip
    assert not (tmp_path / ".curated.curation").exists()  # the work directory goes once the store is published
    result = train(tmp_path / "run", TINY_MODEL + [
        "data=memmap", f"data.paths=[{out}]", "data.val_fraction=0.1", "deepspeed=zero0",
        "deepspeed.micro_batch_size=2", "trainer.seq_len=64", "trainer.max_steps=3", "trainer.log_every=1",
        "trainer.eval_every=0", "trainer.save_every=0", "trainer.progress_bar=false", "optim.warmup_steps=1",
    ])  # fmt: skip
    assert result.returncode == 0
    assert sorted(read_metrics(tmp_path / "run")) == [1, 2, 3]


def test_curate_none_is_todays_output(tmp_path, dedup_corpus):
    records, _ = dedup_corpus
    corpus = write_jsonl(tmp_path / "corpus.jsonl", records[:100])
    common = ["prepare-data", "--source", "text_files", "--paths", str(corpus), "--vocab-size", "300"]
    main([*common, "--out", str(tmp_path / "plain")])
    main([*common, "--curate", "none", "--out", str(tmp_path / "none")])
    for name in sorted(path.name for path in (tmp_path / "plain").iterdir()):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "none" / name).read_bytes(), name
    assert "curation" not in read_header(tmp_path / "none")
    assert not (tmp_path / "none" / "curation").exists()


def test_interrupted_curation_resumes_to_the_same_store(tmp_path, dedup_corpus, monkeypatch):
    import hybridlm.data.curation.pipeline as pipeline

    records = dedup_corpus[0][:150]
    curation = CurationConfig(stages=("exact", "minhash", "gopher_quality"), tasks=2)
    # The clean run runs its tasks side by side (datatrove's process pool), the interrupted one in turn.
    clean, clean_header = curate(tmp_path, records, CurationConfig(**{**vars(curation), "workers": 2}), name="clean")

    build = pipeline.build_pipelines

    def crash_in_filters(*args):
        pipelines = build(*args)
        name, steps, tasks = pipelines[-1]
        return [*pipelines[:-1], (name, [*steps[:-1], _crash], tasks)]

    monkeypatch.setattr(pipeline, "build_pipelines", crash_in_filters)
    with pytest.raises(RuntimeError, match="simulated crash|did not finish"):
        curate(tmp_path, records, curation, name="resumed")
    assert not (tmp_path / "resumed").exists()
    work = tmp_path / ".resumed.curation"
    assert (work / "logs" / "minhash_cluster" / "completions" / "00000").exists()
    monkeypatch.setattr(pipeline, "build_pipelines", build)
    resumed, header = curate(tmp_path, records, curation, name="resumed")
    assert header["content_sha256"] == clean_header["content_sha256"]
    assert sorted(removed_keys(resumed, "minhash", records)) == sorted(removed_keys(clean, "minhash", records))
    assert not work.exists()


def _crash(data, rank: int = 0, world_size: int = 1):
    for index, doc in enumerate(data):
        if index == 3:
            raise RuntimeError("simulated crash midway through the filters")
        yield doc


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--curate", "default", "--minhash-threshold", "1.5"], r"--minhash-threshold=1\.5 must be in"),
        (["--curate", "exact,languages"], "'languages' is not one of"),
        (["--curate", "language"], "downloaded at run time"),
        (["--decontaminate", "missing.jsonl"], "--decontaminate missing.jsonl does not exist"),
        (["--curate", "minhash", "--minhash-bands", "0"], "--minhash-bands=0 must be >= 1"),
        (["--curate", "default", "--executor", "slurm"], "needs --slurm-partition"),
        (["--curate", "default", "--curate-option", "gopher_repetition.dup_line_frac=1.5"],
         r"gopher_repetition.dup_line_frac=1\.5 must be a fraction"),
        (["--curate", "default", "--curate-option", "gopher_quality.min_words=3"],
         "gopher_quality has no setting 'min_words'"),
    ],
)
def test_bad_curation_arguments_fail_before_work(tmp_path, extra, match, dedup_corpus, monkeypatch):
    """Each is one line naming the bad value (prepare-data exits with it), before any file is written."""
    monkeypatch.chdir(tmp_path)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", dedup_corpus[0][:20])
    with pytest.raises(SystemExit, match=match):
        main(["prepare-data", "--source", "text_files", "--paths", str(corpus), *extra, "--out", str(tmp_path / "o")])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["corpus.jsonl"]


def test_empty_or_unreadable_corpus_fails_before_curation(tmp_path):
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": ""}])
    cfg = DataConfig(source="text_files", paths=[str(blank)], vocab_size=300)
    with pytest.raises(ValueError, match="no documents to curate"):
        write_text_store(cfg, tmp_path / "out", curation=CurationConfig(stages=("exact",)))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"caf\xe9 au lait")
    cfg = DataConfig(source="text_files", paths=[str(write_jsonl(tmp_path / "fine.jsonl", [{"text": "fine"}])),
                                                  str(latin1)], vocab_size=300)  # fmt: skip
    with pytest.raises(ValueError, match=r"latin1\.txt is not UTF-8 text"):
        write_text_store(cfg, tmp_path / "out", curation=CurationConfig(stages=("exact",)))
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / ".out.curation").exists()


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = start_test_cluster(tmp_path_factory.mktemp("slurm"), cpus=4)
    yield cluster
    cluster.stop()


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_executor_matches_local(tmp_path, dedup_corpus, slurm, monkeypatch):
    """Every stage kind (per-task, single-task, one task per band) as Slurm job arrays on the real cluster."""
    records = dedup_corpus[0][:200]
    # 4 bands x 4 rows: fewer band tasks keep the job array short; the equality is what is tested.
    settings = dict(stages=("exact", "minhash", "gopher_quality"), minhash=MinhashSettings(bands=4, rows=4), tasks=2)
    local, local_header = curate(tmp_path, records, CurationConfig(**settings), name="local")
    for key, value in slurm.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    on_slurm, header = curate(tmp_path, records, CurationConfig(**settings, executor="slurm", slurm_partition="debug",
                                                               slurm_time="00:10:00", slurm_mem_per_cpu_gb=1),
                              name="slurm")  # fmt: skip
    assert header["content_sha256"] == local_header["content_sha256"]
    for stage in ("exact", "minhash", "gopher_quality"):
        assert sorted(removed_keys(on_slurm, stage, records)) == sorted(removed_keys(local, stage, records)), stage
    assert len(removed_keys(on_slurm, "minhash", records)) > 0
    local_report = json.loads((local / "curation" / "report.json").read_text())
    slurm_report = json.loads((on_slurm / "curation" / "report.json").read_text())
    assert slurm_report["stages"] == local_report["stages"]


@pytest.mark.slurm
@pytest.mark.slow
def test_failed_slurm_job_is_an_error_not_a_hang(tmp_path, dedup_corpus, slurm, monkeypatch):
    import hybridlm.data.curation.pipeline as pipeline

    eval_set = write_jsonl(tmp_path / "eval.jsonl", [{"text": " ".join(["word"] * 20)}])
    materialise = pipeline.materialise_input

    def then_lose_the_eval_set(*args):  # the job's decontamination filter then cannot read it
        materialise(*args)
        eval_set.unlink()

    monkeypatch.setattr(pipeline, "materialise_input", then_lose_the_eval_set)
    for key, value in slurm.env.items():
        monkeypatch.setenv(key, value)
    curation = CurationConfig(stages=("decontaminate",), decontaminate=[str(eval_set)], executor="slurm",
                              slurm_partition="debug", slurm_time="00:05:00", slurm_mem_per_cpu_gb=1)  # fmt: skip
    with pytest.raises(RuntimeError, match="stopped before finishing"):
        curate(tmp_path, dedup_corpus[0][:20], curation)
    assert not (tmp_path / "store").exists()
    logs = (tmp_path / ".store.curation" / "logs" / "filter" / "slurm_logs").glob("*.out")
    assert any("FileNotFoundError" in log.read_text() and "eval.jsonl" in log.read_text() for log in logs)


def test_missing_datatrove_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datatrove", None)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "one document"}])
    cfg = DataConfig(source="text_files", paths=[str(corpus)], vocab_size=300)
    with pytest.raises(ImportError, match=r"pip install 'hybridlm\[curation\]'"):
        write_text_store(cfg, tmp_path / "out", curation=CurationConfig(stages=("exact",)))


def test_work_dir_of_other_settings_starts_afresh(tmp_path):
    from hybridlm.data.curation.pipeline import prepare_work_dir

    work = tmp_path / ".out.curation"
    prepare_work_dir(work, {"stages": ["exact"]})
    (work / "input").mkdir()
    prepare_work_dir(work, {"stages": ["exact"]})  # same settings: resumed as it is
    assert (work / "input").is_dir()
    prepare_work_dir(work, {"stages": ["exact", "minhash"]})  # other settings: nothing of the old run is reused
    assert not (work / "input").exists()
    assert json.loads((work / "settings.json").read_text()) == {"stages": ["exact", "minhash"]}


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("import sys\nfrom .main import main\n\nsys.exit(main())\n", True),
        ("# Fodder for a test\n\ndummy_name = True\n", True),
        ("def f(x):\n    return x\n", True),
        ("# deals #tag $$ sale ### today\n", False),  # hashtag spam: comment-like lines decide nothing
        ("The cat sat on the mat.\nIt was a fine day, all told.\n", False),
        ("Menu\nHome\nLogin\n", False),
    ],
)
def test_looks_like_code(text, code):
    from hybridlm.data.curation.steps import looks_like_code

    assert looks_like_code(text) is code


def test_minhash_threshold_sets_rows():
    assert MinhashSettings().lsh_threshold == pytest.approx((1 / 14) ** (1 / 8))
    assert MinhashSettings(bands=20, threshold=0.8).rows == 13
    assert MinhashSettings(threshold=0.72).rows == 8
