# Cites: DeepConf (arXiv 2508.15260).
"""DeepConf: confidence-filtered parallel reasoning (Fu et al. 2025, "Deep Think with Confidence"), online variant.

Per generated token, the confidence is the mean negative log-probability of the model's `top_k` most likely
candidates: a peaked distribution puts little mass on the runners-up, so their log-probabilities are very negative
and the confidence is high. A trace's group confidence is the mean token confidence over a sliding window of
`window` tokens; its score is its lowest group confidence (the weakest stretch of reasoning).

Online algorithm for one problem with a budget of N traces (the paper's Algorithm 2):
  1. generate `num_warmup` traces in full;
  2. threshold = the (1 - keep_fraction) percentile of their scores (keep_fraction 0.9: "DeepConf-high",
     0.1: "DeepConf-low");
  3. generate the other traces, `round_size` at a time, stopping a trace as soon as a full window's group
     confidence falls under the threshold (its tokens are spent, its answer is dropped); with `consensus` = tau,
     stop starting new rounds once the leading answer holds at least tau of the vote weight (adaptive sampling);
  4. vote among the traces whose score reaches the threshold, each weighted by its score.
The baseline is plain majority voting over N traces generated in full with the same sampler (temperature, top-p).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

AnswerFn = Callable[[list[int]], Hashable | None]  # generated token ids -> answer, None when there is none
# One random stream shared by the whole batch, or one per trace (a trace's draws then come from its own stream only,
# so the same seeds give the same traces in any batch wherever the model's logits for a row do not depend on the
# batch: bitwise on CPU; GPU kernels may differ in the last bits between batch sizes and flip a near-tied draw).
Generators = torch.Generator | Sequence[torch.Generator] | None


def _shared(generator: Generators) -> bool:
    return generator is None or isinstance(generator, torch.Generator)


@dataclass
class DeepConfConfig:
    num_traces: int = 16  # N: the budget of traces per problem, shared with the majority-vote baseline
    num_warmup: int = 4  # traces generated in full to calibrate the stopping threshold
    keep_fraction: float = 0.9  # share of warm-up scores at or above the threshold (0.9 high, 0.1 low)
    window: int = 8  # tokens per group confidence
    top_k: int = 5  # candidates per token confidence
    temperature: float = 1.0
    top_p: float = 1.0  # nucleus sampling: draw from the smallest set of tokens holding this much probability
    max_new_tokens: int = 64
    consensus: float = 0.0  # tau: no new round once the leading answer holds this share of the vote (0: off)
    round_size: int = 0  # traces decoded together after the warm-up; consensus is checked between rounds (0: all)

    def __post_init__(self) -> None:
        for name in ("num_traces", "num_warmup", "window", "top_k", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"deepconf {name}={getattr(self, name)} must be >= 1")
        if self.round_size < 0:
            raise ValueError(f"deepconf round_size={self.round_size} must be >= 0 (0: one round of all traces)")
        if self.num_warmup > self.num_traces:
            raise ValueError(
                f"deepconf num_warmup={self.num_warmup} exceeds num_traces={self.num_traces}; "
                "the warm-up traces are part of the budget, lower num_warmup"
            )
        if not 0.0 < self.keep_fraction <= 1.0:
            raise ValueError(f"deepconf keep_fraction={self.keep_fraction} must be in (0, 1] (0.9 high, 0.1 low)")
        if self.temperature <= 0:
            raise ValueError(f"deepconf temperature={self.temperature} must be > 0 (sampling is what makes N traces)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"deepconf top_p={self.top_p} must be in (0, 1] (1: sample from the whole distribution)")
        if self.consensus and not 0.5 < self.consensus <= 1.0:
            raise ValueError(f"deepconf consensus={self.consensus} must be 0 (off) or in (0.5, 1] (the paper: 0.95)")


@dataclass
class Trace:
    tokens: list[int]  # generated ids, prompt excluded, stop token included
    token_confidences: list[float]
    finished: bool = False  # emitted a stop token
    stopped_early: bool = False  # cut by the confidence threshold
    answer: Hashable | None = None
    score: float = float("nan")  # lowest group confidence


def token_confidence(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """[..., V] logits -> [...] mean negative log-probability of the top_k candidates (high = confident)."""
    if top_k > logits.shape[-1]:
        raise ValueError(f"top_k={top_k} exceeds the vocabulary of {logits.shape[-1]} tokens")
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return -log_probs.topk(top_k, dim=-1).values.mean(dim=-1)


def group_confidences(confidences: Sequence[float], window: int) -> np.ndarray:
    """Mean confidence of every full window of `window` consecutive tokens; one group of all tokens when the
    trace is shorter than a window, none when it is empty."""
    values = np.asarray(confidences, dtype=np.float64)
    if len(values) < window:
        return values.mean(keepdims=True) if len(values) else values
    sums = np.convolve(values, np.ones(window), mode="valid")
    return sums / window


def lowest_group_confidence(confidences: Sequence[float], window: int) -> float:
    groups = group_confidences(confidences, window)
    return float(groups.min()) if len(groups) else float("nan")


def calibrate_threshold(scores: Sequence[float], keep_fraction: float) -> float:
    """The score that `keep_fraction` of the warm-up traces reach."""
    finite = np.asarray([s for s in scores if math.isfinite(s)], dtype=np.float64)
    if len(finite) == 0:
        raise ValueError("no warm-up trace has a confidence score (all were empty); raise max_new_tokens")
    return float(np.percentile(finite, 100.0 * (1.0 - keep_fraction)))


def vote_totals(answers: Sequence[Hashable | None], weights: Sequence[float]) -> dict[Hashable, float]:
    """Total weight of each answer, in order of first appearance; None answers do not vote."""
    totals: dict[Hashable, float] = {}
    for answer, weight in zip(answers, weights, strict=True):
        if answer is not None:
            totals[answer] = totals.get(answer, 0.0) + float(weight)
    return totals


def weighted_vote(answers: Sequence[Hashable | None], weights: Sequence[float]) -> Hashable | None:
    """The answer with the largest total weight (ties: the one seen first); None when no answer votes."""
    totals = vote_totals(answers, weights)
    return max(totals, key=totals.__getitem__) if totals else None  # max keeps the first of equal keys


def leading_share(answers: Sequence[Hashable | None], weights: Sequence[float]) -> float:
    """The leading answer's share of the vote weight (the paper's consensus beta); 0 when no answer votes."""
    totals = vote_totals(answers, weights)
    whole = sum(totals.values())
    return max(totals.values()) / whole if whole > 0 else 0.0


def majority_vote(answers: Sequence[Hashable | None]) -> Hashable | None:
    return weighted_vote(answers, [1.0] * len(answers))


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float, generator: Generators = None) -> torch.Tensor:
    """[B, V] logits -> [B] ids drawn from softmax(logits / temperature), restricted to the nucleus: the most likely
    tokens whose probabilities, taken in decreasing order, first reach `top_p` (the most likely token always).
    `generator`: one for the batch, or one per row."""
    probs = F.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # the mass before a token already reaches top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    if _shared(generator):
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return torch.cat([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, generator, strict=True)])


def trace_generators(seed: int, problem: int, count: int, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """`count` independent random streams for the traces of one problem, fixed by (seed, problem, trace index)."""
    states = np.random.SeedSequence([seed, problem]).spawn(count)
    return [torch.Generator(device=device).manual_seed(int(state.generate_state(1, np.uint64)[0] >> np.uint64(1)))
            for state in states]


def _streams(generator: Generators, start: int, stop: int) -> Generators:
    """The streams of traces start..stop-1: a shared generator stays shared."""
    return generator if _shared(generator) else list(generator[start:stop])


@torch.no_grad()
def generate_traces(
    model,
    prompt_ids: Sequence[int],
    num_traces: int,
    *,
    stop_token_ids: Sequence[int],
    cfg: DeepConfConfig,
    threshold: float | None = None,
    generator: Generators = None,
) -> list[Trace]:
    """Sample `num_traces` continuations of one prompt as a batch, recording each token's confidence.

    With `threshold`, a trace stops as soon as the mean confidence of its last `cfg.window` tokens is below it;
    stopped and finished traces leave the batch, so their compute ends there too. `generator`: one random stream
    for the batch, or a list of one per trace.
    """
    if len(prompt_ids) == 0:
        raise ValueError("the prompt is empty; give at least one token")
    per_trace = not _shared(generator)
    if per_trace and len(generator) != num_traces:
        raise ValueError(f"{len(generator)} generators for {num_traces} traces: give one per trace")
    device = next(model.parameters()).device
    traces = [Trace(tokens=[], token_confidences=[]) for _ in range(num_traces)]
    active = list(range(num_traces))  # trace index of each batch row
    stop = torch.tensor(list(stop_token_ids), device=device, dtype=torch.long)
    cache = model.new_cache(max_length=len(prompt_ids) + cfg.max_new_tokens)
    inputs = torch.tensor([list(prompt_ids)] * num_traces, device=device, dtype=torch.long)
    for _ in range(cfg.max_new_tokens):
        logits = model(inputs, cache=cache, logits_to_keep=1).logits[:, -1]
        confidence = token_confidence(logits, cfg.top_k).tolist()
        sampled = sample_tokens(logits, cfg.temperature, cfg.top_p,
                                [generator[i] for i in active] if per_trace else generator)
        is_stop = torch.isin(sampled, stop).tolist()
        keep_rows = []
        for row, trace_index in enumerate(active):
            trace = traces[trace_index]
            trace.tokens.append(int(sampled[row]))
            trace.token_confidences.append(confidence[row])
            if is_stop[row]:
                trace.finished = True
            elif threshold is not None and len(trace.token_confidences) >= cfg.window and (
                sum(trace.token_confidences[-cfg.window :]) / cfg.window < threshold
            ):
                trace.stopped_early = True
            else:
                keep_rows.append(row)
        if not keep_rows:
            break
        if len(keep_rows) < len(active):
            keep = torch.tensor(keep_rows, device=device)
            cache.select_rows(keep)
            sampled = sampled.index_select(0, keep)
            active = [active[row] for row in keep_rows]
        inputs = sampled[:, None]
    for trace in traces:
        trace.score = lowest_group_confidence(trace.token_confidences, cfg.window)
    return traces


@dataclass
class VoteResult:
    answer: Hashable | None
    traces: list[Trace]
    tokens: int  # generated, including those of traces stopped early
    threshold: float | None = None
    voters: int = 0


def majority_baseline(model, prompt_ids, answer_fn: AnswerFn, *, stop_token_ids, cfg: DeepConfConfig,
                      generator: Generators = None) -> VoteResult:
    """N traces in full, one vote each."""
    traces = generate_traces(model, prompt_ids, cfg.num_traces, stop_token_ids=stop_token_ids, cfg=cfg,
                             generator=generator)
    for trace in traces:
        trace.answer = answer_fn(trace.tokens)
    answers = [t.answer for t in traces]
    return VoteResult(majority_vote(answers), traces, sum(len(t.tokens) for t in traces),
                      voters=sum(a is not None for a in answers))


def deepconf_online(model, prompt_ids, answer_fn: AnswerFn, *, stop_token_ids, cfg: DeepConfConfig,
                    generator: Generators = None) -> VoteResult:
    """Warm-up, calibrated early stopping in rounds (until consensus, if set), then a confidence-weighted vote
    over the traces that pass. With one generator per trace (num_traces of them), trace i samples from stream i."""
    if not _shared(generator) and len(generator) != cfg.num_traces:
        raise ValueError(f"{len(generator)} generators for num_traces={cfg.num_traces}: give one per trace")
    traces = generate_traces(model, prompt_ids, cfg.num_warmup, stop_token_ids=stop_token_ids, cfg=cfg,
                             generator=_streams(generator, 0, cfg.num_warmup))
    threshold = calibrate_threshold([t.score for t in traces], cfg.keep_fraction)
    round_size = cfg.round_size or cfg.num_traces
    voters: list[Trace] = []

    def add_voters(new: list[Trace]) -> None:
        for trace in new:
            if not trace.stopped_early and trace.score >= threshold:
                trace.answer = answer_fn(trace.tokens)
                voters.append(trace)

    add_voters(traces)
    while len(traces) < cfg.num_traces:
        count = min(round_size, cfg.num_traces - len(traces))
        new = generate_traces(model, prompt_ids, count, stop_token_ids=stop_token_ids, cfg=cfg, threshold=threshold,
                              generator=_streams(generator, len(traces), len(traces) + count))
        add_voters(new)
        traces += new
        # As in the paper, consensus is checked after each new trace (here: round), not on the warm-up alone.
        if cfg.consensus and leading_share([t.answer for t in voters], [t.score for t in voters]) >= cfg.consensus:
            break
    answer = weighted_vote([t.answer for t in voters], [t.score for t in voters])
    return VoteResult(answer, traces, sum(len(t.tokens) for t in traces), threshold,
                      voters=sum(t.answer is not None for t in voters))


def confidence_auc(scores: Sequence[float], correct: Sequence[bool]) -> float | None:
    """P(a correct trace's score > a wrong trace's score), ties counting half; None unless both kinds exist.
    0.5: confidence says nothing about correctness; 1.0: it separates them perfectly."""
    right = np.asarray([s for s, ok in zip(scores, correct, strict=True) if ok], dtype=np.float64)
    wrong = np.asarray([s for s, ok in zip(scores, correct, strict=True) if not ok], dtype=np.float64)
    if len(right) == 0 or len(wrong) == 0:
        return None
    above = (right[:, None] > wrong[None, :]).mean()
    tied = (right[:, None] == wrong[None, :]).mean()
    return float(above + 0.5 * tied)


@dataclass
class DeepConfReport:
    """Accuracy and tokens of DeepConf against majority voting with the same N, over a set of problems."""

    config: dict
    problems: int
    majority_accuracy: float
    deepconf_accuracy: float
    # The confidence-weighted, filtered vote applied to the baseline's full traces: the vote's effect alone.
    weighted_vote_full_traces_accuracy: float
    majority_tokens: int
    deepconf_tokens: int
    traces_generated: int  # by DeepConf, warm-up included (fewer than problems x N when consensus ends early)
    traces_stopped_early: int
    single_trace_accuracy: float  # mean over the baseline's traces: what one sample gets right
    # Within-problem AUC of the baseline traces' scores for right vs wrong answers, averaged over the problems that
    # have both: whether confidence tells right from wrong on this task at all (0.5: not at all).
    confidence_auc: float | None
    confidence_auc_problems: int
    per_problem: list[dict] = field(default_factory=list)

    @property
    def tokens_saved(self) -> float:
        return 1.0 - self.deepconf_tokens / max(self.majority_tokens, 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_saved": self.tokens_saved}


def evaluate_deepconf(model, problems: Sequence[tuple[Sequence[int], Hashable]], answer_fn: AnswerFn, *,
                      stop_token_ids: Sequence[int], cfg: DeepConfConfig, seed: int = 0,
                      progress: bool = False) -> DeepConfReport:
    """Run the baseline and DeepConf on every (prompt ids, gold answer) problem. Trace i of a problem samples from
    the same seeded stream in both methods, so DeepConf's traces are the baseline's (up to the batch-size caveat of
    `Generators`), cut where it stops them or left out where consensus ends sampling: the comparison is paired, not
    two independent draws."""
    if not problems:
        raise ValueError("no problems to evaluate")
    from tqdm.auto import tqdm

    model.eval()
    device = next(model.parameters()).device
    majority_correct = deepconf_correct = weighted_correct = 0
    single_correct = single_total = 0
    majority_tokens = deepconf_tokens = stopped = generated = 0
    aucs = []
    per_problem = []
    for index, (prompt_ids, gold) in enumerate(tqdm(problems, desc="deepconf", disable=not progress)):
        baseline = majority_baseline(model, prompt_ids, answer_fn, stop_token_ids=stop_token_ids, cfg=cfg,
                                     generator=trace_generators(seed, index, cfg.num_traces, device))
        online = deepconf_online(model, prompt_ids, answer_fn, stop_token_ids=stop_token_ids, cfg=cfg,
                                 generator=trace_generators(seed, index, cfg.num_traces, device))
        # Offline DeepConf on the baseline's traces: same filter (top keep_fraction by score), weighted vote.
        scores = [t.score for t in baseline.traces]
        cut = calibrate_threshold(scores, cfg.keep_fraction)
        kept = [t for t in baseline.traces if t.score >= cut]
        weighted = weighted_vote([t.answer for t in kept], [t.score for t in kept])

        majority_correct += baseline.answer == gold
        deepconf_correct += online.answer == gold
        weighted_correct += weighted == gold
        single_correct += sum(t.answer == gold for t in baseline.traces)
        single_total += len(baseline.traces)
        majority_tokens += baseline.tokens
        deepconf_tokens += online.tokens
        stopped += sum(t.stopped_early for t in online.traces)
        generated += len(online.traces)
        auc = confidence_auc(scores, [t.answer == gold for t in baseline.traces])
        if auc is not None:
            aucs.append(auc)
        per_problem.append({
            "gold": gold, "majority": baseline.answer, "deepconf": online.answer, "weighted_full": weighted,
            "majority_tokens": baseline.tokens, "deepconf_tokens": online.tokens, "threshold": online.threshold,
            "traces": len(online.traces), "stopped_early": sum(t.stopped_early for t in online.traces),
            "voters": online.voters,
        })
    count = len(problems)
    return DeepConfReport(
        config=asdict(cfg),
        problems=count,
        majority_accuracy=majority_correct / count,
        deepconf_accuracy=deepconf_correct / count,
        weighted_vote_full_traces_accuracy=weighted_correct / count,
        majority_tokens=majority_tokens,
        deepconf_tokens=deepconf_tokens,
        traces_generated=generated,
        traces_stopped_early=stopped,
        single_trace_accuracy=single_correct / single_total,
        confidence_auc=float(np.mean(aucs)) if aucs else None,
        confidence_auc_problems=len(aucs),
        per_problem=per_problem,
    )
