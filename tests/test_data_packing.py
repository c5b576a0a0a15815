"""Packing, batch layout, rank split and resume on in-memory documents (no files, no tokenizer)."""

import numpy as np
import pytest
import torch

from hybridlm.data import segment_ids_from_cu_seqlens, unigram_cross_entropy
from hybridlm.data.config import MQARConfig
from hybridlm.data.loader import TrainIterator, ValidationBatches, epoch_order
from hybridlm.data.mqar import ExampleRows, answer_counts, generate_examples
from hybridlm.data.packing import PackedRows, collate, count_rows
from hybridlm.loss import IGNORE_INDEX

EOS = 0


class ListDocuments:
    def __init__(self, documents):
        self._documents = documents
        self.lengths = np.array([len(document) for document in documents], dtype=np.int64)
        self.num_documents = len(documents)

    def document(self, index):
        return self._documents[index]


def random_documents(count, max_length, seed=0):
    rng = np.random.default_rng(seed)
    return ListDocuments([rng.integers(1, 50, size=rng.integers(1, max_length)) for _ in range(count)])


def reference_rows(documents, order, seq_len):
    """Independent packed layout: concatenate documents + EOS, then cut; every quantity from per-token arrays."""
    stream, doc_ids, positions = [], [], []
    for doc_index in order:
        tokens = list(documents.document(doc_index)) + [EOS]
        stream += tokens
        doc_ids += [doc_index] * len(tokens)
        positions += list(range(len(tokens)))
    total = len(stream)
    rows = []
    for start in range(0, total, seq_len):
        inputs = np.full(seq_len, EOS)
        labels = np.full(seq_len, IGNORE_INDEX)
        pos = np.zeros(seq_len, dtype=np.int64)
        starts = []
        for t in range(seq_len):
            s = start + t
            if s >= total:  # padding segment
                if t == 0 or start + t - 1 < total:
                    starts.append(t)
                pos[t] = t - starts[-1]
                continue
            inputs[t] = stream[s]
            same_doc_next = s + 1 < total and doc_ids[s + 1] == doc_ids[s] and positions[s + 1] == positions[s] + 1
            if same_doc_next:
                labels[t] = stream[s + 1]
            if t == 0 or positions[s] == 0:
                starts.append(t)
            pos[t] = positions[s] - positions[start + starts[-1]]
        rows.append((inputs, labels, pos, starts))
    return rows


@pytest.mark.parametrize("seq_len", [1, 7, 16, 64])
def test_packed_rows_match_reference(seq_len):
    documents = random_documents(40, 30)
    order = epoch_order(documents.num_documents, seed=3, shuffle=True)
    rows = PackedRows(documents, order, seq_len=seq_len, eos_token_id=EOS, pack=True, infinite=False)
    produced = []
    while (row := rows.next_row()) is not None:
        produced.append(row)
    expected = reference_rows(documents, order(0), seq_len)
    assert len(produced) == len(expected) == count_rows(documents.lengths, seq_len, pack=True)
    for row, (inputs, labels, positions, starts) in zip(produced, expected):
        np.testing.assert_array_equal(row.input_ids, inputs)
        np.testing.assert_array_equal(row.labels, labels)
        np.testing.assert_array_equal(row.position_ids, positions)
        assert row.segment_starts == starts


def test_unpacked_rows_hold_one_document_each():
    documents = random_documents(30, 40, seed=1)
    seq_len = 16
    rows = PackedRows(documents, epoch_order(30, seed=0, shuffle=False), seq_len=seq_len, eos_token_id=EOS,
                      pack=False, infinite=False)
    produced = []
    while (row := rows.next_row()) is not None:
        produced.append(row)
    assert len(produced) == count_rows(documents.lengths, seq_len, pack=False)
    row_iter = iter(produced)
    for index in range(30):
        with_eos = np.append(documents.document(index), EOS)
        inputs, labels = [], []
        for start in range(0, len(with_eos), seq_len):
            row = next(row_iter)
            used = min(seq_len, len(with_eos) - start)
            assert row.segment_starts == [0]
            np.testing.assert_array_equal(row.position_ids, np.arange(seq_len))
            assert (row.input_ids[used:] == EOS).all() and (row.labels[used:] == IGNORE_INDEX).all()
            inputs.append(row.input_ids[:used])
            labels.append(row.labels[:used])
        # The document's pieces reassemble it; targets are the shifted document, none for its EOS.
        np.testing.assert_array_equal(np.concatenate(inputs), with_eos)
        np.testing.assert_array_equal(np.concatenate(labels), np.append(with_eos[1:], IGNORE_INDEX))
    assert next(row_iter, None) is None


def test_collate_cu_seqlens_and_segment_ids():
    documents = random_documents(20, 25, seed=2)
    rows = PackedRows(documents, epoch_order(20, seed=0, shuffle=True), seq_len=12, eos_token_id=EOS, pack=True,
                      infinite=True)
    batch = collate([rows.next_row() for _ in range(5)])
    input_ids, labels, positions, cu_seqlens = (batch[k] for k in ("input_ids", "labels", "position_ids", "cu_seqlens"))
    assert cu_seqlens.dtype == torch.int32 and input_ids.dtype == labels.dtype == positions.dtype == torch.int64
    total = input_ids.numel()
    segments = segment_ids_from_cu_seqlens(cu_seqlens, total)
    flat_positions = positions.reshape(-1)
    # Position ids restart exactly at segment starts and count up inside a segment.
    starts = torch.zeros(total, dtype=torch.bool)
    starts[cu_seqlens[:-1].long()] = True
    assert torch.equal(flat_positions == 0, starts)
    assert torch.equal(flat_positions[1:][~starts[1:]], flat_positions[:-1][~starts[1:]] + 1)
    # Every row boundary is a segment boundary.
    assert set(range(0, total + 1, 12)) <= set(cu_seqlens.tolist())
    # A label is the next input inside the same segment, except at a row's last token (next row continues it).
    flat_inputs, flat_labels = input_ids.reshape(-1), labels.reshape(-1)
    for t in range(total - 1):
        if flat_labels[t] != IGNORE_INDEX and (t + 1) % 12 != 0:
            assert segments[t] == segments[t + 1] and flat_labels[t] == flat_inputs[t + 1]
    # The EOS that ends a document never has a target.
    assert (flat_labels[flat_inputs == EOS] == IGNORE_INDEX).all()


def test_segment_ids_rejects_bad_cu_seqlens():
    assert segment_ids_from_cu_seqlens(torch.tensor([0, 2, 5]), 5).tolist() == [0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="total=6"):
        segment_ids_from_cu_seqlens(torch.tensor([0, 2, 5]), 6)
    with pytest.raises(ValueError, match="strictly increasing"):
        segment_ids_from_cu_seqlens(torch.tensor([0, 2, 2, 5]), 5)


def make_train(documents, *, micro_batch_size, rank=0, world_size=1, seed=0, seq_len=10):
    rows = PackedRows(documents, epoch_order(documents.num_documents, seed=seed, shuffle=True), seq_len=seq_len,
                      eos_token_id=EOS, pack=True, infinite=True)
    return TrainIterator(rows, micro_batch_size=micro_batch_size, rank=rank, world_size=world_size, seed=seed,
                         data_fingerprint="fake")


def test_resume_gives_identical_batches_across_epochs():
    documents = random_documents(6, 20, seed=4)  # ~70 tokens: an epoch every few batches
    loader = make_train(documents, micro_batch_size=3)
    for _ in range(5):
        next(loader)
    state = loader.state_dict()
    expected = [next(loader) for _ in range(12)]
    assert loader.rows.epoch >= 2
    resumed = make_train(documents, micro_batch_size=3)
    resumed.load_state_dict(state)
    for want, got in zip(expected, (next(resumed) for _ in range(12))):
        for key in want:
            assert torch.equal(want[key], got[key])


def test_epochs_are_reshuffled_and_seed_changes_order():
    documents = random_documents(50, 5, seed=5)
    order = epoch_order(50, seed=1, shuffle=True)
    assert not np.array_equal(order(0), order(1))
    assert sorted(order(0)) == list(range(50))
    assert not torch.equal(next(make_train(documents, micro_batch_size=2, seed=1))["input_ids"],
                           next(make_train(documents, micro_batch_size=2, seed=2))["input_ids"])


def test_resume_rejects_other_seed():
    documents = random_documents(6, 20)
    state = make_train(documents, micro_batch_size=2, seed=0).state_dict()
    with pytest.raises(ValueError, match="seed=0"):
        make_train(documents, micro_batch_size=2, seed=1).load_state_dict(state)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_take_disjoint_slices_of_the_global_batch(world_size):
    documents = random_documents(15, 30, seed=6)
    micro = 2
    single = make_train(documents, micro_batch_size=micro * world_size)
    ranks = [make_train(documents, micro_batch_size=micro, rank=r, world_size=world_size) for r in range(world_size)]
    for _ in range(7):
        whole = next(single)["input_ids"]
        parts = [next(loader)["input_ids"] for loader in ranks]
        assert torch.equal(torch.cat(parts), whole)
    # The global position is the same on every rank, so one state resumes any of them (or another world size).
    states = [loader.state_dict() for loader in ranks]
    assert all(state == states[0] for state in states)
    assert states[0]["global_rows"] == 7 * micro * world_size


def test_validation_batches_repeat_and_drop_incomplete_global_batch():
    documents = random_documents(11, 30, seed=7)
    seq_len, micro, world = 8, 2, 2
    total_rows = count_rows(documents.lengths, seq_len, pack=True)

    def make_rows():
        return PackedRows(documents, epoch_order(11, seed=0, shuffle=False), seq_len=seq_len, eos_token_id=EOS,
                          pack=True, infinite=False)

    per_rank = [ValidationBatches(make_rows, total_rows, micro_batch_size=micro, rank=r, world_size=world)
                for r in range(world)]
    first = [list(val()) for val in per_rank]
    assert len(first[0]) == len(first[1]) == total_rows // (micro * world) > 0
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first[0], list(per_rank[0]())))
    assert len(list(per_rank[0](max_batches=1))) == 1
    rows = make_rows()
    all_rows = [rows.next_row().input_ids for _ in range(total_rows)]
    dealt = torch.cat([torch.cat([first[r][b]["input_ids"] for r in range(world)]) for b in range(len(first[0]))])
    assert torch.equal(dealt, torch.from_numpy(np.stack(all_rows[: len(dealt)])))
    with pytest.raises(ValueError, match="max_batches=0"):
        per_rank[0](max_batches=0)


def test_mqar_examples_and_labels():
    cfg = MQARConfig(num_kv_pairs=4, num_queries=3, vocab_size=40, num_examples=64, num_val_examples=8)
    examples = generate_examples(cfg, 64, "train")
    assert examples.shape == (64, 14)
    np.testing.assert_array_equal(examples, generate_examples(cfg, 64, "train"))
    assert not np.array_equal(examples[:8], generate_examples(cfg, 8, "val"))
    first_value = 1 + cfg.keys
    for example in examples:
        keys, values = example[0:8:2], example[1:8:2]
        assert len(set(keys)) == 4 and (1 <= keys).all() and (keys < first_value).all()
        assert (values >= first_value).all() and (values < 40).all()
        binding = dict(zip(keys, values))
        for query_key, answer in zip(example[8::2], example[9::2]):
            assert binding[query_key] == answer
    rows = ExampleRows(cfg, examples, epoch_order(64, seed=0, shuffle=False), seq_len=20, infinite=False)
    row = rows.next_row()
    labelled = np.flatnonzero(row.labels != IGNORE_INDEX)
    np.testing.assert_array_equal(labelled, [8, 10, 12])  # the query keys only
    np.testing.assert_array_equal(row.labels[labelled], examples[0][[9, 11, 13]])
    assert (row.input_ids[14:] == 0).all() and row.segment_starts == [0]
    np.testing.assert_array_equal(answer_counts(cfg, examples[:1]), np.bincount(examples[0][[9, 11, 13]], minlength=40))


def test_unigram_cross_entropy_matches_hand_computation():
    train, val = np.array([3, 0, 1]), np.array([1, 2, 0])
    probs = np.array([4, 1, 2]) / 7  # add-one counts over (4 tokens + 3 vocabulary)
    expected = -(np.log(probs[0]) + 2 * np.log(probs[1])) / 3
    assert unigram_cross_entropy(train, val) == pytest.approx(expected)
