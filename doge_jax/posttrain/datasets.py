"""Small post-training datasets made by this project: generated from templates, offline, deterministic.

    builtin("chat")            short conversations: greetings, who-are-you, capitals, opposites, counting, spelling
    builtin("arith")           arithmetic questions answered as "a + b = c. The answer is c."
    builtin("arith_think")     the same with a worked thought in `reasoning_content` (for the thinking template)
    builtin("sft_mix")         chat + arith, interleaved
    builtin("prefs")           DPO pairs: the right answer (chosen) vs a wrong number / wrong fact / a refusal
    builtin("arith_prompts")   GRPO prompts with a verifiable `answer` (rewards.py checks "The answer is N.")

Each record is a dict in the formats the stages read (see records.py): {"messages"} for SFT, {"prompt", "chosen",
"rejected"} for DPO, {"prompt", "answer"} for GRPO. Write one to a file to look at it or edit it:

    python -m doge_jax.posttrain.datasets arith --out /tmp/arith.jsonl --num 100
"""

from __future__ import annotations

import argparse
import json
import random
import sys

SYSTEM = "You are Doge, a small helpful assistant."
IDENTITY = "I am Doge, a small language model trained with doge-jax."
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia", "Chile": "Santiago", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw", "Greece": "Athens", "Turkey": "Ankara",
    "Russia": "Moscow", "Portugal": "Lisbon", "Ireland": "Dublin", "Austria": "Vienna", "Cuba": "Havana",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "light": "dark", "old": "new", "happy": "sad",
    "early": "late", "open": "closed", "full": "empty", "hard": "soft", "wet": "dry", "high": "low", "in": "out",
}
WORDS = ["cat", "dog", "sun", "tree", "book", "fish", "moon", "bird", "rain", "star", "milk", "ship", "lamp"]
GREETINGS = ["Hello!", "Hi", "Hi there!", "Good morning.", "Hey, how are you?", "Hello, Doge."]
GREETING_REPLY = "Hello! How can I help you today?"
WHO = ["Who are you?", "What is your name?", "Tell me about yourself.", "What are you?"]
REFUSAL = "I do not know."

ASK = {
    "+": ["What is {a} + {b}?", "Compute {a} + {b}.", "What is {a} plus {b}?", "Add {a} and {b}."],
    "-": ["What is {a} - {b}?", "Compute {a} - {b}.", "What is {a} minus {b}?", "Subtract {b} from {a}."],
    "*": ["What is {a} * {b}?", "Compute {a} * {b}.", "What is {a} times {b}?", "Multiply {a} by {b}."],
}


def answer_text(value: int) -> str:
    """The final sentence rewards.py looks for."""
    return f"The answer is {value}."


def arith_problem(rng: random.Random, max_operand: int = 20) -> tuple[str, int, str]:
    """(question, answer, worked line) for a random + / − / × problem with operands up to max_operand."""
    op = rng.choice("++-*")  # addition twice as often: the easiest skill to show rising under GRPO
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    if op == "-" and b > a:
        a, b = b, a
    if op == "*":
        a, b = a % 10, b % 10
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return rng.choice(ASK[op]).format(a=a, b=b), value, f"{a} {op} {b} = {value}"


def _thought(line: str) -> str:
    """A short worked step: tens and units for sums and differences, the product otherwise."""
    left, value = line.split(" = ")
    a, op, b = left.split(" ")
    a, b = int(a), int(b)
    if op == "+" and a >= 10 and b >= 10:
        return (f"{a} = {a // 10 * 10} + {a % 10} and {b} = {b // 10 * 10} + {b % 10}. "
                f"{a // 10 * 10} + {b // 10 * 10} = {a // 10 * 10 + b // 10 * 10}, {a % 10} + {b % 10} = "
                f"{a % 10 + b % 10}. So {line}.")
    return f"{line}."


def _user(text: str, rng: random.Random, p_system: float = 0.3) -> list[dict]:
    system = [{"role": "system", "content": SYSTEM}] if rng.random() < p_system else []
    return system + [{"role": "user", "content": text}]


def _chat_pair(rng: random.Random) -> tuple[str, str, str]:
    """(question, good reply, a plausible bad reply) for one chat skill."""
    kind = rng.randrange(6)
    if kind == 0:
        return rng.choice(GREETINGS), GREETING_REPLY, "Go away."
    if kind == 1:
        return rng.choice(WHO), IDENTITY, "I am a cat."
    if kind == 2:
        country, capital = rng.choice(sorted(CAPITALS.items()))
        wrong = rng.choice([c for c in CAPITALS.values() if c != capital])
        q = rng.choice(["What is the capital of {c}?", "Name the capital city of {c}.",
                        "{c}: which city is its capital?"])
        return q.format(c=country), f"The capital of {country} is {capital}.", f"The capital of {country} is {wrong}."
    if kind == 3:
        word, opposite = rng.choice(sorted(OPPOSITES.items()))
        wrong = rng.choice([w for w in OPPOSITES if w != word])
        return (f"What is the opposite of {word}?", f"The opposite of {word} is {opposite}.",
                f"The opposite of {word} is {wrong}.")
    if kind == 4:
        start = rng.randint(1, 10)
        end = start + rng.randint(2, 5)
        good = ", ".join(str(i) for i in range(start, end + 1)) + "."
        bad = ", ".join(str(i) for i in range(start, end + 1, 2)) + "."
        return f"Count from {start} to {end}.", good, bad
    word = rng.choice(WORDS)
    return f"Spell the word {word}.", "-".join(word) + ".", "-".join(reversed(word)) + "."


def chat(num: int = 1000, seed: int = 0) -> list[dict]:
    rng = random.Random(f"chat-{seed}")
    out = []
    for _ in range(num):
        q, good, _ = _chat_pair(rng)
        messages = _user(q, rng) + [{"role": "assistant", "content": good}]
        if rng.random() < 0.2:  # a second turn, so multi-turn masking is exercised
            q2, good2, _ = _chat_pair(rng)
            messages += [{"role": "user", "content": q2}, {"role": "assistant", "content": good2}]
        out.append({"messages": messages})
    return out


def arith(num: int = 2000, seed: int = 0, *, think: bool = False, max_operand: int = 20) -> list[dict]:
    rng = random.Random(f"arith-{seed}")
    out = []
    for _ in range(num):
        q, value, line = arith_problem(rng, max_operand)
        reply = {"role": "assistant", "content": answer_text(value)}
        if think:
            reply["reasoning_content"] = _thought(line)
        else:
            reply["content"] = f"{line}. {answer_text(value)}"
        out.append({"messages": _user(q, rng) + [reply]})
    return out


def sft_mix(num: int = 3000, seed: int = 0) -> list[dict]:
    a, c = arith(num // 2, seed), chat(num - num // 2, seed)
    return [x for pair in zip(a, c) for x in pair] + a[len(c):] + c[len(a):]


def prefs(num: int = 1000, seed: int = 0, max_operand: int = 20) -> list[dict]:
    rng = random.Random(f"prefs-{seed}")
    out = []
    for _ in range(num):
        if rng.random() < 0.5:
            q, value, line = arith_problem(rng, max_operand)
            wrong = value + rng.choice([-3, -2, -1, 1, 2, 3, 10])
            left = line.split(" = ")[0]
            chosen = f"{line}. {answer_text(value)}"
            rejected = rng.choice([f"{left} = {wrong}. {answer_text(wrong)}", REFUSAL, f"{left} = {value}."])
        else:
            q, chosen, rejected = _chat_pair(rng)
            if rng.random() < 0.3:
                rejected = REFUSAL
        out.append({"prompt": _user(q, rng), "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}]})
    return out


def arith_prompts(num: int = 2000, seed: int = 0, max_operand: int = 20) -> list[dict]:
    rng = random.Random(f"arith-prompts-{seed}")
    out = []
    for _ in range(num):
        q, value, _ = arith_problem(rng, max_operand)
        out.append({"prompt": _user(q, rng, p_system=0.0), "answer": str(value)})
    return out


BUILTIN = {
    "chat": chat,
    "arith": arith,
    "arith_think": lambda num=2000, seed=0: arith(num, seed, think=True),
    "sft_mix": sft_mix,
    "prefs": prefs,
    "arith_prompts": arith_prompts,
}


def builtin(name: str, num: int | None = None, seed: int = 0) -> list[dict]:
    if name not in BUILTIN:
        raise ValueError(f"builtin dataset {name!r} is not one of {sorted(BUILTIN)}")
    return BUILTIN[name](seed=seed) if num is None else BUILTIN[name](num=num, seed=seed)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m doge_jax.posttrain.datasets", description=__doc__.split("\n")[0])
    p.add_argument("name", choices=sorted(BUILTIN))
    p.add_argument("--out", required=True, help="a .jsonl file")
    p.add_argument("--num", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    with open(args.out, "w") as f:
        for record in builtin(args.name, args.num, args.seed):
            f.write(json.dumps(record) + "\n")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
