"""DeepConf mechanics: confidences, windows, thresholds, votes, early stopping, on a tiny model trained here."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from hybridlm.evaluate.arithmetic import EOS_ID, ArithmeticTask, tiny_model_config, train_on_task
from hybridlm.evaluate.deepconf import (
    DeepConfConfig,
    calibrate_threshold,
    confidence_auc,
    deepconf_online,
    evaluate_deepconf,
    generate_traces,
    group_confidences,
    leading_share,
    lowest_group_confidence,
    majority_baseline,
    majority_vote,
    sample_tokens,
    token_confidence,
    trace_generators,
    weighted_vote,
)
from hybridlm.model import HybridLM

TASK = ArithmeticTask(digits=2)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained_model():
    """A two-layer hybrid trained ~150 steps on 2-digit addition: partly right, so traces disagree."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: thread hand-offs cost more than they save on a shared 2-core box
    try:
        torch.manual_seed(0)
        model = HybridLM(tiny_model_config(TASK))
        losses = train_on_task(model, TASK, steps=150, batch_size=32, seed=0)
        yield model, losses
    finally:
        torch.set_num_threads(threads)


# --- pure functions against hand computations ----------------------------------------------------------------------


def test_token_confidence_is_mean_negative_top_k_log_probability():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    probs = torch.softmax(logits, dim=-1)
    expected_peaked = -(math.log(probs[0, 0]) + math.log(probs[0, 1])) / 2
    got = token_confidence(logits, top_k=2)
    assert got[0].item() == pytest.approx(expected_peaked, rel=1e-6)
    assert got[1].item() == pytest.approx(math.log(4), rel=1e-6)  # uniform: the least confident possible
    with pytest.raises(ValueError, match="top_k=5 exceeds the vocabulary of 4"):
        token_confidence(logits, top_k=5)


def test_confidence_is_higher_for_a_peaked_distribution():
    peaked = torch.tensor([10.0, 0.0, 0.0, 0.0, 0.0])
    flat = torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6])
    assert token_confidence(peaked, 3) > token_confidence(flat, 3)


def test_group_confidences_match_a_loop():
    values = [0.5, 2.0, 1.0, 3.0, 0.1, 4.0, 2.5]
    window = 3
    expected = [sum(values[i : i + window]) / window for i in range(len(values) - window + 1)]
    np.testing.assert_allclose(group_confidences(values, window), expected, rtol=1e-12)
    assert lowest_group_confidence(values, window) == pytest.approx(min(expected))
    np.testing.assert_allclose(group_confidences([1.0, 3.0], 5), [2.0])  # shorter than a window: one group
    assert math.isnan(lowest_group_confidence([], 4))


def test_threshold_keeps_the_requested_share_of_warmup_scores():
    scores = list(range(1, 11))  # 1..10
    high = calibrate_threshold(scores, keep_fraction=0.9)
    low = calibrate_threshold(scores, keep_fraction=0.1)
    assert sum(s >= high for s in scores) == 9
    assert sum(s >= low for s in scores) == 1
    with pytest.raises(ValueError, match="no warm-up trace has a confidence score"):
        calibrate_threshold([float("nan")], 0.9)


def test_weighted_vote_differs_from_majority_on_constructed_traces():
    # Three unsure traces say 7, two confident ones say 12.
    answers = [7, 7, 7, 12, 12, None]
    confidences = [1.0, 1.1, 0.9, 5.0, 4.0, 100.0]  # the answerless trace must not vote whatever its weight
    assert majority_vote(answers) == 7
    assert weighted_vote(answers, confidences) == 12
    assert weighted_vote([3, 4], [1.0, 1.0]) == 3  # ties go to the answer seen first
    assert weighted_vote([None, None], [1.0, 2.0]) is None
    assert leading_share(answers, confidences) == pytest.approx(9.0 / 12.0)  # 12 holds 9 of the 12 votes
    assert leading_share([None], [1.0]) == 0.0


def test_nucleus_sampling_draws_only_from_the_top_p_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log().expand(4000, -1)
    generator = torch.Generator().manual_seed(0)
    drawn = sample_tokens(logits, 1.0, 0.7, generator)  # 0.5 < 0.7 <= 0.8: the first two tokens, renormalised
    assert set(drawn.tolist()) == {0, 1}
    assert (drawn == 0).float().mean().item() == pytest.approx(0.5 / 0.8, abs=0.03)
    assert set(sample_tokens(logits, 1.0, 0.4, generator).tolist()) == {0}  # the most likely token always stays
    assert set(sample_tokens(logits, 1.0, 1.0, generator).tolist()) == {0, 1, 2, 3}


def test_confidence_auc_counts_right_over_wrong_pairs():
    # Right traces score 3 and 1, wrong ones 2 and 1: pairs (3>2, 3>1, 1<2, 1=1) -> (1 + 1 + 0 + 0.5) / 4.
    assert confidence_auc([3.0, 2.0, 1.0, 1.0], [True, False, True, False]) == pytest.approx(0.625)
    assert confidence_auc([1.0, 2.0], [True, True]) is None


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"num_warmup": 9, "num_traces": 8}, "num_warmup=9 exceeds num_traces=8"),
        ({"keep_fraction": 0.0}, "keep_fraction=0.0 must be in"),
        ({"window": 0}, "window=0 must be >= 1"),
        ({"temperature": 0.0}, "temperature=0.0 must be > 0"),
        ({"top_p": 0.0}, "top_p=0.0 must be in"),
        ({"consensus": 0.3}, "consensus=0.3 must be 0"),
        ({"round_size": -1}, "round_size=-1 must be >= 0"),
    ],
)
def test_bad_config_is_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        DeepConfConfig(**overrides)


def test_arithmetic_task_answers_its_own_solutions():
    rng = np.random.default_rng(0)
    for a, b in TASK.sample_operands(rng, 50):
        ids = TASK.encode(TASK.solution(a, b)) + [EOS_ID]
        assert TASK.answer(ids) == a + b
    assert TASK.answer(TASK.encode("1+2+0=03|03")) is None  # no EOS: unfinished
    assert TASK.answer(TASK.encode("1+2+0=03") + [EOS_ID]) is None  # no answer after |
    assert len(TASK.prompt(3, 4)) + len(TASK.solution(3, 4)) + 1 == TASK.example_length


# --- generation on a trained model -------------------------------------------------------------------------------


def test_training_learned_the_task(trained_model):
    _, losses = trained_model
    assert np.mean(losses[-10:]) < 0.35 * np.mean(losses[:5])


def test_recorded_confidences_match_a_full_recomputation(trained_model):
    """The batched, cache-pruning sampler records for each token the confidence a fresh forward pass gives."""
    model, _ = trained_model
    cfg = DeepConfConfig(max_new_tokens=TASK.example_length, window=4, top_k=3)
    prompt = TASK.encode(TASK.prompt(47, 85))
    # A threshold between the traces' scores makes some stop early, so the batch shrinks mid-generation.
    traces = generate_traces(model, prompt, 6, stop_token_ids=[EOS_ID], cfg=cfg, threshold=2.2,
                             generator=torch.Generator().manual_seed(0))
    for trace in traces:
        ids = torch.tensor([prompt + trace.tokens])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1]
        np.testing.assert_allclose(trace.token_confidences, token_confidence(logits, 3).numpy(), rtol=1e-4,
                                   atol=1e-5)


def test_early_stop_cuts_traces_at_the_threshold(trained_model):
    model, _ = trained_model
    cfg = DeepConfConfig(max_new_tokens=TASK.example_length, window=4)
    prompt = TASK.encode(TASK.prompt(38, 49))
    full = generate_traces(model, prompt, 8, stop_token_ids=[EOS_ID], cfg=cfg,
                           generator=torch.Generator().manual_seed(1))
    assert not any(t.stopped_early for t in full)
    # A threshold above every score stops each trace at its first full window (or at EOS, if sooner).
    cut = generate_traces(model, prompt, 8, stop_token_ids=[EOS_ID], cfg=cfg, threshold=float("inf"),
                          generator=torch.Generator().manual_seed(1))
    assert all(len(t.tokens) == cfg.window and t.stopped_early for t in cut)
    # An in-between threshold: a trace is stopped exactly when its last window first falls below it.
    threshold = float(np.median([t.score for t in full]))
    mixed = generate_traces(model, prompt, 8, stop_token_ids=[EOS_ID], cfg=cfg, threshold=threshold,
                            generator=torch.Generator().manual_seed(1))
    for trace in mixed:
        windows = group_confidences(trace.token_confidences, cfg.window) if len(trace.tokens) >= cfg.window else []
        if trace.stopped_early:
            assert windows[-1] < threshold and all(w >= threshold for w in windows[:-1])
            assert trace.tokens[-1] != EOS_ID
        else:
            assert trace.finished or len(trace.tokens) == cfg.max_new_tokens
            assert all(w >= threshold for w in windows)


def test_online_deepconf_votes_only_with_confident_traces(trained_model):
    model, _ = trained_model
    cfg = DeepConfConfig(num_traces=10, num_warmup=4, keep_fraction=0.5, window=4,
                         max_new_tokens=TASK.example_length)
    prompt = TASK.encode(TASK.prompt(26, 57))
    result = deepconf_online(model, prompt, TASK.answer, stop_token_ids=[EOS_ID], cfg=cfg,
                             generator=torch.Generator().manual_seed(2))
    assert len(result.traces) == 10
    warmup = result.traces[:4]
    assert not any(t.stopped_early for t in warmup)
    assert sum(t.score >= result.threshold for t in warmup) >= 2  # the 50th percentile of four scores
    voters = [t for t in result.traces if not t.stopped_early and t.score >= result.threshold]
    expected = weighted_vote([TASK.answer(t.tokens) for t in voters], [t.score for t in voters])
    assert result.answer == expected
    assert result.tokens == sum(len(t.tokens) for t in result.traces)


def test_deepconf_saves_tokens_against_majority_voting(trained_model):
    """The report's figures on a few problems: DeepConf-low (keep 10 %) spends fewer tokens for the same N."""
    model, _ = trained_model
    cfg = DeepConfConfig(num_traces=8, num_warmup=3, keep_fraction=0.1, window=4, max_new_tokens=TASK.example_length)
    problems = TASK.problems(6, seed=3)
    report = evaluate_deepconf(model, problems, TASK.answer, stop_token_ids=TASK.stop_token_ids, cfg=cfg, seed=0)
    assert report.traces_stopped_early > 0
    assert report.deepconf_tokens < report.majority_tokens
    assert 0.0 < report.tokens_saved < 1.0
    assert [row["gold"] for row in report.per_problem] == [gold for _, gold in problems]
    assert sum(row["deepconf_tokens"] for row in report.per_problem) == report.deepconf_tokens
    assert report.to_dict()["tokens_saved"] == pytest.approx(report.tokens_saved)
    print(f"\nDeepConf-low on {report.problems} problems: majority acc {report.majority_accuracy:.2f} "
          f"({report.majority_tokens} tokens), DeepConf acc {report.deepconf_accuracy:.2f} "
          f"({report.deepconf_tokens} tokens, {report.tokens_saved:.0%} saved), single trace "
          f"{report.single_trace_accuracy:.2f}")


def test_consensus_stops_new_rounds_once_the_vote_agrees(trained_model):
    """Adaptive sampling: after the warm-up, rounds of `round_size` traces until the leading answer holds
    `consensus` of the vote weight; without consensus the whole budget is spent."""
    model, _ = trained_model
    cfg = DeepConfConfig(num_traces=16, num_warmup=4, keep_fraction=0.9, window=4, round_size=4, top_p=0.9,
                         max_new_tokens=TASK.example_length)
    prompt = TASK.encode(TASK.prompt(23, 14))  # one the model mostly gets right: its vote agrees early
    full = deepconf_online(model, prompt, TASK.answer, stop_token_ids=[EOS_ID], cfg=cfg,
                           generator=torch.Generator().manual_seed(3))
    assert len(full.traces) == 16
    agreeing = dataclasses.replace(cfg, consensus=0.51)
    result = deepconf_online(model, prompt, TASK.answer, stop_token_ids=[EOS_ID], cfg=agreeing,
                             generator=torch.Generator().manual_seed(3))
    assert len(result.traces) < 16 and (len(result.traces) - 4) % 4 == 0

    def share(count: int) -> float:  # the vote of the first `count` traces
        voters = [t for t in result.traces[:count] if not t.stopped_early and t.score >= result.threshold]
        return leading_share([TASK.answer(t.tokens) for t in voters], [t.score for t in voters])

    assert share(len(result.traces)) >= 0.51  # stopped because the vote agreed...
    assert all(share(count) < 0.51 for count in range(8, len(result.traces), 4))  # ...and not at an earlier round
    assert result.tokens == sum(len(t.tokens) for t in result.traces) < full.tokens


def test_per_trace_streams_make_deepconf_cut_the_baselines_own_traces(trained_model):
    """With one seeded stream per trace, DeepConf's trace i is the baseline's trace i, cut where DeepConf stops it:
    the two methods are compared on the same samples."""
    model, _ = trained_model
    cfg = DeepConfConfig(num_traces=12, num_warmup=4, keep_fraction=0.5, window=4, round_size=4,
                         max_new_tokens=TASK.example_length)
    prompt = TASK.encode(TASK.prompt(58, 27))
    baseline = majority_baseline(model, prompt, TASK.answer, stop_token_ids=[EOS_ID], cfg=cfg,
                                 generator=trace_generators(0, 5, 12))
    online = deepconf_online(model, prompt, TASK.answer, stop_token_ids=[EOS_ID], cfg=cfg,
                             generator=trace_generators(0, 5, 12))
    assert any(t.stopped_early for t in online.traces) and len(online.traces) == 12
    assert len({tuple(t.tokens) for t in baseline.traces}) > 1  # the streams differ from trace to trace
    for cut, full in zip(online.traces, baseline.traces):
        assert full.tokens[: len(cut.tokens)] == cut.tokens
        assert cut.stopped_early or cut.tokens == full.tokens
    with pytest.raises(ValueError, match="3 generators for num_traces=12"):
        deepconf_online(model, prompt, TASK.answer, stop_token_ids=[EOS_ID], cfg=cfg,
                        generator=trace_generators(0, 5, 3))


def load_script():
    spec = importlib.util.spec_from_file_location("eval_deepconf", REPO / "eval" / "deepconf_arithmetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_setup_saves_tokens_and_keeps_accuracy():
    """The committed eval/deepconf_arithmetic.py setting on its first 20 problems: DeepConf-high generates at least
    5 % fewer tokens than majority voting with the same N and is at most one problem (0.05) less accurate."""
    script = load_script()
    args = script.parse_args(["--problems", "20"])
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        model, _ = script.train_model(args, TASK)
        cfg = dataclasses.replace(script.deepconf_config(args, TASK), keep_fraction=0.9)
        report = evaluate_deepconf(model, TASK.problems(args.problems, seed=args.seed + 1), TASK.answer,
                                   stop_token_ids=TASK.stop_token_ids, cfg=cfg, seed=args.seed)
    finally:
        torch.set_num_threads(threads)
    print(f"\nDeepConf-high on 20 problems: majority {report.majority_accuracy:.2f} ({report.majority_tokens} "
          f"tokens), DeepConf {report.deepconf_accuracy:.2f} ({report.deepconf_tokens} tokens, "
          f"{report.tokens_saved:.0%} saved), one trace {report.single_trace_accuracy:.2f}")
    assert report.single_trace_accuracy < 0.9  # the model errs, so the vote has work to do
    assert report.tokens_saved >= 0.05
    assert report.deepconf_accuracy >= report.majority_accuracy - 0.05
