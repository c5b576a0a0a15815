"""Write the tiny SFT example dataset (examples/sft/tiny_{train,val}.jsonl) that `experiment=sft` trains on.

Three string and arithmetic tasks, each answered with a short worked solution ending in `Answer: X`, so a model's
reply can be scored by exact match on X (`answer_of`). Some conversations have a system prompt, some a second
user/assistant exchange (every assistant turn is trained). Deterministic: rerunning rewrites the same files.

    python examples/sft/make_tiny_sft.py            # 400 training and 60 held-out conversations
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
LETTERS = "abcdefghijklmnopqrstuvwxyz"
SYSTEM = "You are a careful assistant. Work step by step, then give the answer."


def repeat_task(rng: random.Random) -> tuple[str, str, str]:
    word = "".join(rng.choices(LETTERS, k=rng.randint(3, 6)))
    return f"Repeat the word {word}.", f"The word is {word}. Answer: {word}", word


def reverse_task(rng: random.Random) -> tuple[str, str, str]:
    word = "".join(rng.choices(LETTERS, k=rng.randint(3, 5)))
    answer = word[::-1]
    return (f"Reverse the word {word}.",
            f"Letters from the end: {' '.join(answer)}. Answer: {answer}", answer)


def add_task(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(10, 49), rng.randint(10, 49)
    ones = a % 10 + b % 10
    tens = a // 10 + b // 10 + ones // 10
    return (f"What is {a} + {b}?",
            f"Ones: {a % 10} + {b % 10} = {ones}. Tens: {a // 10} + {b // 10} + {ones // 10} = {tens}. "
            f"Answer: {a + b}", str(a + b))


TASKS = (repeat_task, reverse_task, add_task)


def answer_of(reply: str) -> str | None:
    """The X of the first `Answer: X` in a reply (None when there is none)."""
    match = re.search(r"Answer: (\S+)", reply)
    return match.group(1) if match else None


def conversation(rng: random.Random) -> dict:
    """A row: `messages`, and the expected answer of the last turn (for exact-match scoring)."""
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.3 else []
    for _ in range(2 if rng.random() < 0.25 else 1):
        question, reply, answer = rng.choice(TASKS)(rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    return {"messages": messages, "answer": answer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--val", type=int, default=60)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    rng = random.Random(0)
    seen: set[str] = set()
    for name, count in (("train", args.train), ("val", args.val)):
        rows = []
        while len(rows) < count:
            row = conversation(rng)
            key = json.dumps(row["messages"])
            if key not in seen:  # held-out conversations never appear in training
                seen.add(key)
                rows.append(row)
        path = args.out / f"tiny_{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"wrote {count} conversations to {path}")


if __name__ == "__main__":
    main()
