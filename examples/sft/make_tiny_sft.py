"""Write the tiny SFT example dataset (examples/sft/tiny_{train,val}.jsonl) that `experiment=sft` trains on.

Three string and arithmetic tasks answered with a short worked solution, and one (which kind of characters) answered
in a word; every reply ends in `Answer: X`, so it can be scored by exact match on X (`answer_of`). Each row names the
task of its last turn. Some conversations have a system prompt, some a second user/assistant exchange (every
assistant turn is trained). Held out by construction: no question of the held-out split is asked in training.
Deterministic: rerunning rewrites the same files.

    python examples/sft/make_tiny_sft.py            # 1000 training and 120 held-out conversations
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


# Characters of one kind each; `kind_task` asks which kind a short sequence is.
KINDS = {"capitals": "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "digits": "0123456789", "letters": LETTERS, "symbols": "+-*/=<>%&#"}


def kind_task(rng: random.Random) -> tuple[str, str, str]:
    kind = rng.choice(sorted(KINDS))
    items = rng.choices(KINDS[kind], k=rng.randint(3, 5))
    return f"What kind of characters are {' '.join(items)}?", f"Answer: {kind}", kind


TASKS = (repeat_task, reverse_task, add_task, kind_task)
# How often each task is drawn. kind_task's one-word answer depends on the whole prompt but needs no copying, which a
# tiny model learns within 100 SFT steps (tests/test_sft_recipe.py); the others need copying or carrying digits across
# the chat template and stay out of its reach at that budget. Drawn as often as the others together, so that the
# held-out split has enough of it to score.
TASK_WEIGHTS = (1, 1, 1, 3)


def answer_of(reply: str) -> str | None:
    """The X of the first `Answer: X` in a reply (None when there is none)."""
    match = re.search(r"Answer: (\S+)", reply)
    return match.group(1) if match else None


def conversation(rng: random.Random) -> dict:
    """A row: `messages`, the task and the expected answer of the last turn (for exact-match scoring)."""
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.3 else []
    for _ in range(2 if rng.random() < 0.25 else 1):
        (task,) = rng.choices(TASKS, weights=TASK_WEIGHTS)
        question, reply, answer = task(rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    return {"messages": messages, "task": task.__name__.removesuffix("_task"), "answer": answer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--val", type=int, default=120)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    rng = random.Random(0)
    seen: set[str] = set()  # every question asked so far
    for name, count in (("train", args.train), ("val", args.val)):
        rows = []
        while len(rows) < count:
            row = conversation(rng)
            questions = {m["content"] for m in row["messages"] if m["role"] == "user"}
            if not questions & seen:  # no held-out question is ever asked in training, nor asked twice
                seen.update(questions)
                rows.append(row)
        path = args.out / f"tiny_{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"wrote {count} conversations to {path}")


if __name__ == "__main__":
    main()
