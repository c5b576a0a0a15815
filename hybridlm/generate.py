"""Decoding with the model's cache: GDN layers carry conv + recurrent state, attention layers keys and values.

Batched prompts of different lengths are left-padded; `attention_mask` marks the padding, which the model keeps out
of attention (its own segment) and out of the GDN state (a zero input), and positions count real tokens only.
"""

from __future__ import annotations

import argparse

import torch

from hybridlm.model import HybridLM


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (input_ids [B,T], attention_mask [B,T]) padded on the left to the longest."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("every prompt needs at least one token; got an empty prompt")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids, mask


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions that count real tokens only (left padding sits at position 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _pick(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row from [B,V] logits: argmax at temperature 0, else sampling (optionally top-k)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: HybridLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    eos_token_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend left-padded prompts `input_ids` [B,T] by `max_new_tokens`; returns [B, T + max_new_tokens].

    With `use_cache` the prompt is run once and each new token against the cache; without it, every step re-runs
    the whole sequence (the reference the cached path is tested against). Rows that emitted `eos_token_id` keep
    emitting it.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0: greedy)")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
    if (attention_mask[:, -1] == 0).any():
        raise ValueError("prompts must be left-padded: the last column of attention_mask has padding")
    was_training = model.training
    model.eval()
    B, T = input_ids.shape
    total = T + max_new_tokens
    # The whole output, mask and positions up front: each step writes one column, nothing is re-concatenated.
    tokens = torch.empty(B, total, dtype=input_ids.dtype, device=input_ids.device)
    tokens[:, :T] = input_ids
    mask = torch.cat([attention_mask.long(), attention_mask.new_ones(B, max_new_tokens, dtype=torch.long)], dim=1)
    positions = positions_from_mask(mask)
    padded = not bool(attention_mask.all())  # without padding the model needs no mask at all
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    cache = model.new_cache(max_length=total) if use_cache else None
    for length in range(T, total):
        # With the cache: the prompt once, then the newest token (the cache remembers where the padding was).
        start = length - 1 if use_cache and length > T else 0
        step_mask = mask[:, start:length] if padded and start == 0 else None
        out = model(tokens[:, start:length], position_ids=positions[:, start:length], cache=cache,
                    attention_mask=step_mask, logits_to_keep=1)
        next_token = _pick(out.logits[:, -1].float(), temperature, top_k, generator)
        if eos_token_id is not None:
            next_token = torch.where(finished, torch.full_like(next_token, eos_token_id), next_token)
            finished |= next_token == eos_token_id
        tokens[:, length] = next_token
    model.train(was_training)
    return tokens


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The tokens a chat model continues to answer `messages`: the tokenizer's chat template with its generation
    prompt, exactly as transformers' apply_chat_template renders it."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])


def add_generate_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="sample a few continuations from a checkpoint (run dir, DeepSpeed checkpoint or export)",
        description="Load a checkpoint with its tokenizer and print continuations of the prompts.",
    )
    parser.add_argument("checkpoint", help="run directory, DeepSpeed checkpoint directory, or an exported model")
    parser.add_argument("prompts", nargs="+", help="one or more prompts, generated as one left-padded batch")
    parser.add_argument("--chat", action="store_true",
                        help="each prompt is a user message, rendered with the tokenizer's chat template (its "
                             "generation prompt appended); the reply ends at the end-of-turn token")
    parser.add_argument("--system", default="", help="with --chat: a system message before each prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from hybridlm.checkpoint.reader import read_checkpoint

    ckpt = read_checkpoint(args.checkpoint)
    if ckpt.tokenizer_dir is None:
        raise SystemExit(f"no tokenizer found beside {args.checkpoint}; generation needs one to encode the prompts")
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt.tokenizer_dir))
    model = ckpt.build_model().to(args.device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    if args.chat:
        if not tokenizer.chat_template:
            raise SystemExit(f"--chat: the tokenizer of {args.checkpoint} has no chat template; fine-tune it with "
                             "`train.py experiment=sft` (which adds one) or drop --chat")
        system = [{"role": "system", "content": args.system}] if args.system else []
        encoded = [chat_prompt_ids(tokenizer, system + [{"role": "user", "content": p}]) for p in args.prompts]
    elif args.system:
        raise SystemExit("--system needs --chat")
    else:
        encoded = [tokenizer.encode(p) for p in args.prompts]
    ids, mask = left_pad(encoded, pad_id)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    out = generate(
        model,
        ids.to(args.device),
        mask.to(args.device),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        eos_token_id=tokenizer.eos_token_id,
        generator=generator,
    )
    for prompt, row in zip(args.prompts, out[:, ids.shape[1] :].tolist()):
        print(f"{prompt!r} -> {tokenizer.decode(row, skip_special_tokens=True)!r}")
    return 0
