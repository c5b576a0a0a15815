"""Supervised fine-tuning data (hybridlm.data.sft): template parity, assistant-only labels, bad rows, packing without
leaks across conversations, the loss normalisation over a whole optimizer step, and the chat-token embedding growth."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from hybridlm.config import AttentionConfig, GatedDeltaNetConfig, ModelConfig, MoEConfig
from hybridlm.data.config import DataConfig, SFTConfig
from hybridlm.data.loader import epoch_order
from hybridlm.data.packing import collate
from hybridlm.data.sft import (
    CHATML_TEMPLATE,
    IM_END,
    IM_START,
    BadRows,
    BadRowsError,
    ChatEncoder,
    PackedConversations,
    add_chat_template,
    best_fit_decreasing,
    encode_split,
    read_conversations,
    shifted_labels,
)
from hybridlm.data.tokenizer import train_byte_level_bpe
from hybridlm.loss import IGNORE_INDEX
from hybridlm.model import HybridLM

SYSTEM = {"role": "system", "content": "You are terse."}
TURNS = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "It is 5."},
    {"role": "user", "content": "And 4 + 4?"},
    {"role": "assistant", "content": "8, twice 4."},
]
# Qwen2.5's ChatML template without {% generation %} markers: the assistant spans are found from the prefixes.
UNMARKED_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    texts = [json.dumps(TURNS), "the quick brown fox jumps over the lazy dog 0123456789 + = ?"] * 20
    tok = train_byte_level_bpe(texts, 300)
    base = len(tok)
    assert add_chat_template(tok) == [IM_START, IM_END]
    assert len(tok) == base + 2 and tok.eos_token == IM_END
    return tok


def encode_text(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("template", ["ours", "unmarked"])
@pytest.mark.parametrize("messages", [TURNS[:2], TURNS, [SYSTEM, *TURNS]], ids=["one-turn", "multi-turn", "system"])
def test_rendering_matches_apply_chat_template_and_trains_assistant_turns(tokenizer, template, messages):
    tokenizer.chat_template = CHATML_TEMPLATE if template == "ours" else UNMARKED_CHATML
    try:
        encoder = ChatEncoder(tokenizer, "assistant")
        ids, mask = encoder.trained_mask(messages)
        assert ids.tolist() == list(tokenizer.apply_chat_template(messages)["input_ids"])
        # What is trained, turn by turn: the content and <|im_end|> (the unmarked template's span also holds the
        # newline that ends the turn, which is all it can know of a turn's end).
        end = IM_END if template == "ours" else IM_END + "\n"
        trained = [m["content"] + end for m in messages if m["role"] == "assistant"]
        runs = np.split(ids[mask], np.flatnonzero(np.diff(np.flatnonzero(mask)) > 1) + 1)
        assert [tokenizer.decode(run.tolist()) for run in runs] == trained
        # The trained tokens counted by hand: each assistant content alone, plus its end-of-turn token(s).
        by_hand = sum(len(encode_text(tokenizer, m["content"])) + len(encode_text(tokenizer, end))
                      for m in messages if m["role"] == "assistant")
        labels = shifted_labels(ids, mask)
        assert int((labels != IGNORE_INDEX).sum()) == by_hand == int(mask.sum())
        # completion: the last assistant turn only; all: every token after the first.
        _, last = ChatEncoder(tokenizer, "completion").trained_mask(messages)
        assert tokenizer.decode(ids[last].tolist()) == trained[-1]
        assert ChatEncoder(tokenizer, "all").trained_mask(messages)[1].all()
    finally:
        tokenizer.chat_template = CHATML_TEMPLATE


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    # Drops every assistant turn but the last from the history (as reasoning templates drop old thoughts).
    rewriting = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
                 "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    tokenizer.chat_template = rewriting
    try:
        with pytest.raises(ValueError, match="generation"):
            ChatEncoder(tokenizer, "assistant").trained_mask(TURNS)
    finally:
        tokenizer.chat_template = CHATML_TEMPLATE


def tiny_config(vocab_size: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=32, num_layers=3, layer_pattern="GAG", mlp_pattern="MDM",
        intermediate_size=48,
        gdn=GatedDeltaNetConfig(num_k_heads=2, num_v_heads=4, head_k_dim=8, head_v_dim=8),
        attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=8, partial_rotary_factor=0.5),
        moe=MoEConfig(num_experts=4, top_k=2, intermediate_size=16, shared_expert_intermediate_size=16),
    )


def grads(model) -> dict[str, torch.Tensor]:
    out = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def test_labels_ignore_everything_but_assistant_targets(tokenizer):
    torch.manual_seed(0)
    model = HybridLM(tiny_config(len(tokenizer)))
    ids, mask = ChatEncoder(tokenizer, "assistant").trained_mask([SYSTEM, *TURNS])
    inputs = torch.from_numpy(ids)[None]

    def gradient(targets: np.ndarray) -> dict[str, torch.Tensor]:
        labels = torch.from_numpy(shifted_labels(targets, mask))[None]
        model(inputs, labels=labels, num_items_in_batch=1).ce_loss.backward()
        return grads(model)

    reference = gradient(ids)
    rng = np.random.default_rng(0)
    other = ids.copy()
    other[~mask] = rng.integers(0, len(tokenizer), int((~mask).sum()))  # new system/user/template targets
    for name, grad in gradient(other).items():
        assert torch.equal(grad, reference[name]), name
    changed = ids.copy()
    changed[np.flatnonzero(mask)[0]] = (ids[np.flatnonzero(mask)[0]] + 1) % len(tokenizer)  # one assistant target
    assert not torch.equal(gradient(changed)["embed_tokens.weight"], reference["embed_tokens.weight"])


def conversations(count: int, seed: int = 0) -> list[list[dict]]:
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "seven", "plus", "two", "is", "nine", "?"]
    out = []
    for i in range(count):
        turns = [SYSTEM] if i % 3 == 0 else []
        for _ in range(1 + i % 2):
            turns.append({"role": "user", "content": " ".join(rng.choice(words, rng.integers(2, 8)))})
            turns.append({"role": "assistant", "content": " ".join(rng.choice(words, rng.integers(1, 10)))})
        out.append(turns)
    return out


def test_packed_conversations_give_the_losses_and_gradients_of_separate_rows(tokenizer):
    """The leak check: N conversations packed into rows (GDN, conv, attention reset at every boundary) score and
    train exactly as the N run alone, fp32, with GDN, attention, dense and MoE layers. MoE's balancing and z losses
    are functions of the whole batch's routing, so the comparison is on the LM loss, which is per token."""
    torch.manual_seed(0)
    model = HybridLM(tiny_config(len(tokenizer))).float()
    encoder = ChatEncoder(tokenizer, "assistant")
    split = encode_split([(f"row{i}", m) for i, m in enumerate(conversations(7))], encoder, SFTConfig(), 96,
                         BadRows())
    assert len(split.bins) < len(split.conversations)  # several conversations share a row
    packed = PackedConversations(split.conversations, split.bins, epoch_order(len(split.bins), seed=0, shuffle=False),
                                 seq_len=96, pad_token_id=tokenizer.pad_token_id, infinite=False)
    batch = collate([packed.next_row() for _ in split.bins])
    assert packed.next_row() is None

    logits = model(batch["input_ids"], position_ids=batch["position_ids"], cu_seqlens=batch["cu_seqlens"]).logits
    token_losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                                                     ignore_index=IGNORE_INDEX, reduction="none")
    packed_losses, starts = {}, batch["cu_seqlens"].tolist()
    for index in range(len(split.conversations)):  # find each conversation's segment by its tokens
        ids = torch.from_numpy(split.conversations[index][0])
        segment = next(s for s, e in zip(starts, starts[1:]) if e - s == len(ids)
                       and torch.equal(batch["input_ids"].flatten()[s:e], ids) and s not in packed_losses.values())
        packed_losses[index] = segment
    summed = model(batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"],
                   cu_seqlens=batch["cu_seqlens"], num_items_in_batch=1).ce_loss
    summed.backward()
    packed_grads = grads(model)

    total = 0.0
    for index, (ids, labels) in enumerate(split.conversations):
        alone = model(torch.from_numpy(ids)[None], labels=torch.from_numpy(labels)[None], num_items_in_batch=1)
        start = packed_losses[index]
        in_pack = token_losses[start : start + len(ids)].sum()
        assert abs(float(in_pack) - float(alone.ce_loss.detach())) <= 1e-6 * float(alone.ce_loss.detach()), index
        alone.ce_loss.backward()
        total += float(alone.ce_loss)
    alone_grads = grads(model)
    assert abs(float(summed) - total) <= 1e-6 * total
    assert packed_grads.keys() == alone_grads.keys()
    # fp32 rounding alone: the worst measured is 1.2e-6 relative, on the decay gate (in_proj_a, A_log, dt_bias), whose
    # gradient sums every token's contribution with cancelling signs; the rest stay under 5e-7. A leak is far larger
    # even in this untrained model: the same rows without their boundaries (one sequence per row) change a
    # conversation's loss by 2.4e-4 relative, 100x the gradient tolerance (asserted below, so the check can fail).
    for name, grad in packed_grads.items():
        error = float((grad - alone_grads[name]).norm() / alone_grads[name].norm().clamp(min=1e-30))
        assert error <= 2e-6, (name, error)
    with torch.no_grad():
        leaked = model(batch["input_ids"], position_ids=batch["position_ids"]).logits
    leaked_losses = torch.nn.functional.cross_entropy(leaked.flatten(0, 1), batch["labels"].flatten(),
                                                      ignore_index=IGNORE_INDEX, reduction="none")
    def relative_change(index: int) -> float:
        start, end = packed_losses[index], packed_losses[index] + len(split.conversations[index][0])
        ours = float(token_losses[start:end].sum())
        return abs(float(leaked_losses[start:end].sum()) - ours) / ours

    worst_leak = max(relative_change(index) for index in packed_losses)
    assert worst_leak > 1e-4, worst_leak


def test_loss_is_the_mean_over_the_steps_trained_tokens(tokenizer):
    """Two micro-batches with different trained-token counts: with the step's divisor (trainer: _step_batches), the
    accumulated loss (DeepSpeed averages micro-batches) equals the mean over all trained tokens of the step, which
    the mean of per-micro-batch means does not."""
    from types import SimpleNamespace

    from hybridlm.train.engine import DistInfo
    from hybridlm.train.loop import _step_batches

    torch.manual_seed(0)
    model = HybridLM(tiny_config(len(tokenizer)))
    encoder = ChatEncoder(tokenizer, "assistant")
    rows = [encoder.encode(m) for m in conversations(2, seed=1)]
    micro = [collate([PackedConversations([row], [[0]], lambda e: np.arange(1), seq_len=160,
                                          pad_token_id=tokenizer.pad_token_id, infinite=False).next_row()])
             for row in rows]
    counts = [int((b["labels"] != IGNORE_INDEX).sum()) for b in micro]
    assert counts[0] != counts[1]
    bundle = SimpleNamespace(train=iter(micro))
    batches, divisor = _step_batches(bundle, 2, DistInfo(0, 1, 0, torch.device("cpu")), token_mean=True)
    step_loss = sum(model(**b, num_items_in_batch=divisor).ce_loss for b in batches) / 2
    sums = [model(**b, num_items_in_batch=1).ce_loss for b in micro]
    assert torch.allclose(step_loss, sum(sums) / sum(counts), rtol=1e-6)
    assert not torch.allclose(step_loss, (sums[0] / counts[0] + sums[1] / counts[1]) / 2, rtol=1e-3)
    assert _step_batches(SimpleNamespace(train=iter(micro)), 2, None, token_mean=False)[1] is None


def test_embedding_grows_for_chat_tokens_and_keeps_the_old_model():
    torch.manual_seed(0)
    for tie in (True, False):
        model = HybridLM(dataclasses.replace(tiny_config(40), tie_embeddings=tie))
        inputs = torch.randint(0, 40, (1, 12))
        before = model(inputs).logits
        old = model.embed_tokens.weight.detach().clone()
        model.resize_token_embeddings(42)
        assert model.config.vocab_size == 42 and model.embed_tokens.weight.shape == (42, 32)
        assert torch.equal(model.embed_tokens.weight[:40], old)
        assert torch.allclose(model.embed_tokens.weight[40:], old.mean(0).expand(2, -1))
        after = model(inputs).logits
        assert after.shape[-1] == 42 and torch.equal(after[..., :40], before)
        with pytest.raises(ValueError, match="drop tokens"):
            model.resize_token_embeddings(41)


def write_rows(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


GOOD = {"messages": TURNS}
BAD_ROWS = {
    "no assistant turn": {"messages": [{"role": "user", "content": "hi"}]},
    "unknown role": {"messages": [{"role": "robot", "content": "hi"}, TURNS[1]]},
    "wrong type": {"messages": [{"role": "user", "content": 3}, TURNS[1]]},
    "empty content": {"messages": [{"role": "user", "content": "  "}, TURNS[1]]},
    "not a list": {"messages": "hello"},
    "no fields": {"text": "hello"},
    "invalid json": "{not json",
    "empty completion": {"prompt": "hi", "completion": ""},
}


@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_bad_rows_are_refused_or_skipped_with_their_row_numbers(tmp_path, kind):
    path = write_rows(tmp_path / "chat.jsonl", [GOOD, BAD_ROWS[kind], GOOD, BAD_ROWS[kind]])
    with pytest.raises(BadRowsError, match=r"2 malformed .*chat\.jsonl:2, chat\.jsonl:4.*on_bad_row=skip"):
        read_conversations([path], SFTConfig())
    good, bad = read_conversations([path], SFTConfig(on_bad_row="skip"))
    assert [location for location, _ in good] == ["chat.jsonl:1", "chat.jsonl:3"]
    assert bad.total == 2 and "chat.jsonl:2, chat.jsonl:4" in bad.summary()


def test_prompt_completion_rows_and_field_names(tmp_path):
    path = write_rows(tmp_path / "pc.jsonl", [{"q": "2 + 3?", "a": "5"}, {"q": [TURNS[0]], "a": [TURNS[1]]}])
    good, _ = read_conversations([path], SFTConfig(prompt_field="q", completion_field="a"))
    assert [m for _, m in good] == [[{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "5"}],
                                    TURNS[:2]]
    import pyarrow as pa
    import pyarrow.parquet as pq

    chat = [{"from": "user", "text": "hi"}, {"from": "assistant", "text": "yo"}]
    pq.write_table(pa.Table.from_pylist([{"chat": chat}]), tmp_path / "chat.parquet")
    cfg = SFTConfig(messages_field="chat", role_field="from", content_field="text")
    assert [m for _, m in read_conversations([str(tmp_path / "chat.parquet")], cfg)[0]] == [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]]


def test_overlong_conversations_are_cut_or_refused(tokenizer):
    encoder = ChatEncoder(tokenizer, "assistant")
    rows = [("long.jsonl:1", TURNS)]
    length = len(encoder.encode(TURNS)[0])
    with pytest.raises(ValueError, match=r"long\.jsonl:1 .*overlong=truncate"):
        encode_split(rows, encoder, SFTConfig(overlong="error"), length - 3, BadRows())
    split = encode_split(rows, encoder, SFTConfig(), length - 3, BadRows())
    ids, labels = split.conversations[0]
    assert split.truncated == 1 and len(ids) == length - 3 and labels[-1] == IGNORE_INDEX


def test_best_fit_decreasing_wastes_little_on_a_realistic_length_mix():
    """Log-normal conversation lengths (median ~500 tokens, a long tail cut at the row) into 4096-token rows."""
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.lognormal(np.log(500), 0.9, 5000).astype(int) + 8, 4096)
    bins = best_fit_decreasing(lengths, 4096)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(len(lengths)))
    assert max(lengths[b].sum() for b in bins) <= 4096
    padding = 1 - lengths.sum() / (len(bins) * 4096)
    assert padding < 0.01, padding  # measured 0.2 %; a first-come greedy packer wastes ~10 % here


def test_data_config_rejects_bad_sft_settings():
    with pytest.raises(ValueError, match="data.sft.train_on='prompt'"):
        SFTConfig(train_on="prompt")
    with pytest.raises(ValueError, match="data.tokenizer=checkpoint"):
        DataConfig(source="sft", paths=["x.jsonl"])
    with pytest.raises(ValueError, match="data.paths"):
        DataConfig(source="sft", tokenizer="checkpoint")
