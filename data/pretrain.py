"""Pretraining text for the R1-Zero base model: the task's material written the way pretraining text is.

R1-Zero's premise is a base model that has seen math (worked solutions, equations, boxed answers) in plain
pretraining text, but never the R1 prompt template, never `<think>`/`</think>` reasoning blocks, and never a
question followed by an R1-formatted answer. This module writes such a corpus for the demo's task (two-operand
addition), from *train-split* problems only (`data.tasks.split_of`: the held-out problems never appear):
  prose     a worked solution in words ("add the ones: 5 plus 8 is 13, write 3 and carry 1 ...")
  lines     the column steps as `x+y+c=s` lines, then the sum
  table     a few `a+b=c` facts in a row, no working
  qa        "Question: ... Answer: 83": a bare answer
  tagged    the column steps wrapped in a markup tag (<work>, <calc>, <scratch>, ...), as web text has markup,
            never the tag `think`
  question  "What is 35 + 48?", a sentence of English, then the column steps and the sum (no tags)
  english   a few sentences of plain English (web text), none of them the R1 template or its instruction
Some worked documents end with "The answer is \\boxed{83}." as math text does. Documents are separated by the
tokenizer's end-of-text token when the corpus is tokenized, so the model learns that a document stops.
`check_base_corpus` asserts what the base model must not have seen (tested).

Knobs for the tag-copying experiments (docs/demo.md, "What did not work"): `random_tags` = share of tagged
documents whose tag name is invented (`pseudo_word`) or, with `tag_names`, drawn from that list (`think`
always dropped), so that closing the tag means copying its name rather than recalling a known pair.
"""
from __future__ import annotations

import random

from data.prompts import R1_INSTRUCTION, R1_ZERO_TEMPLATE
from data.tasks import split_of

# Markup tag names as web text has them: ordinary words, each one token of the base tokenizer (as in Qwen2.5's,
# where `<work>` is "<", "work", ">"), so that closing a tag means copying one token. Never `think`.
TAG_WORDS = ("work", "calc", "scratch", "steps", "notes", "draft", "sum", "note", "math", "plan", "idea", "sketch",
             "proof", "check", "solve", "carry", "column", "digits", "memo", "aside", "hint", "trace", "detail",
             "method", "working", "reason", "mind", "logic", "brief", "page", "box", "item", "list", "text", "part",
             "line", "row", "cell", "table", "body", "main", "side", "quote", "code", "data", "info", "tip", "key",
             "step", "try", "test", "guess", "hand", "pen", "board", "slate", "paper", "sheet", "card", "block",
             "area", "zone", "field", "space", "frame", "panel", "label", "title", "head", "foot", "span", "aux",
             "temp", "tmp", "pad", "log", "out", "calcs", "sums", "ans")
TAGS = tuple(t for t in TAG_WORDS if t != "think")
KINDS = ("prose", "lines", "table", "qa", "tagged", "question", "english")
DEFAULT_MIX = {"prose": 0.05, "lines": 0.15, "table": 0.0, "qa": 0.0, "tagged": 0.3, "question": 0.45,
               "english": 0.05}
ENGLISH = [
    "The weather was cold in the morning and warm by the afternoon.", "She asked a question about the old map.",
    "A good teacher explains the idea first and then gives an example.", "We walked to the market and bought bread.",
    "The students wrote their answers on the board.", "He thinks the train will be late again today.",
    "Reading a book in the evening helps me relax.", "The first step is to read the problem carefully.",
    "Please close the door when you leave the room.", "The user manual describes every button of the machine.",
    "They talked for an hour about music and films.", "The answer to the riddle was hidden in the last line.",
    "Our team solved the puzzle together in ten minutes.", "The river runs through the middle of the town.",
    "I think the reasoning in this article is clear.", "The assistant brought coffee for everyone at the meeting.",
    "Numbers can be added in any order.", "The final chapter explains how the story ends.",
    "A conversation with a friend can change your mind.", "Put the books back on the shelf, please.",
    "The process takes a few days to complete.", "Each box contains a small toy and a card.",
    "The mind needs rest as much as the body does.", "Write your name at the top of the page.",
]
# Labels before a question and before its answer, as in forum threads, textbooks and dialogues (never the R1
# template's "User:" / "Assistant:").
Q_LABELS = ("Q: ", "Question: ", "Problem: ", "Exercise: ", "Student: ", "Tom: ", "Ann: ", "Reader: ", "Kid: ",
            "Quiz: ", "Task: ", "Me: ", "")
A_LABELS = ("A: ", "Answer: ", "Solution: ", "Teacher: ", "Mom: ", "Reply: ", "Tutor: ", "Bob: ", "Key: ", "")


def markup_sentence(rng: random.Random, tag: str | None = None) -> str:
    """A sentence about markup, as tutorials have them (tag names from TAGS unless given, never think)."""
    t = tag or rng.choice(TAGS)
    return rng.choice([f"Text between <{t}> and </{t}> is kept apart, i.e., <{t}> like this </{t}> here.",
                       f"The <{t}> </{t}> tags wrap a block of the page.",
                       f"Use <{t}> text </{t}> for notes."])


def pseudo_word(rng: random.Random) -> str:
    """A fresh made-up tag name ("bako", "tirelu"): a tag a model has never seen can only be closed by copying
    the name from its opening tag, which is what closing `<think>` needs."""
    return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(1, 3)))


def train_pairs(min_value: int = 10, max_value: int = 99) -> list[tuple[int, int]]:
    """Every (a, b) addition in range whose problem belongs to the train split of the arithmetic task."""
    return [(a, b) for a in range(min_value, max_value + 1) for b in range(min_value, max_value + 1)
            if split_of(f"arith:{a}+{b}") == "train"]


def column_steps(a: int, b: int) -> list[tuple[int, int, int, int]]:
    """(digit of a, digit of b, carry in, digit sum) right to left."""
    out, carry = [], 0
    da, db = str(a)[::-1], str(b)[::-1]
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        out.append((x, y, carry, x + y + carry))
        carry = (x + y + carry) // 10
    return out


def _boxed(total: int, rng: random.Random, p: float) -> str:
    return f" The answer is \\boxed{{{total}}}." if rng.random() < p else ""


def _question(a: int, b: int, rng: random.Random, min_sentences: int, max_sentences: int) -> str:
    """A labelled question, some English after it, and the label of the reply (ends where the work starts)."""
    return (rng.choice(Q_LABELS) + f"What is {a} + {b}? "
            + " ".join(rng.sample(ENGLISH, rng.randint(min_sentences, max_sentences))) + "\n" + rng.choice(A_LABELS))


def doc(kind: str, a: int, b: int, rng: random.Random, boxed_p: float = 0.5, random_tags: float = 0.0,
        tag_names: tuple[str, ...] = ()) -> str:
    s = a + b
    steps = column_steps(a, b)
    work = "\n".join(f"{x}+{y}+{c}={t}" for x, y, c, t in steps)   # the column steps as lines
    if kind == "prose":
        names = ["ones", "tens", "hundreds"]
        parts = []
        for i, (x, y, c, t) in enumerate(steps):
            carry = f" plus {c}" if c else ""
            tail = f"write {t % 10} and carry {t // 10}" if t >= 10 and i < len(steps) - 1 else f"write {t}"
            parts.append(f"the {names[i]}: {x} plus {y}{carry} is {t}, {tail}")
        opener = rng.choice(["To add {a} and {b}, start with", "Let us add {a} and {b}. First", "Adding {a} and {b}: take",
                             "What is {a} + {b}? To add {a} and {b}, start with"])
        return (opener.format(a=a, b=b) + " " + "; then ".join(parts) + f". So {a} + {b} = {s}." + _boxed(s, rng, boxed_p))
    if kind == "lines":
        return f"{a} + {b}:\n" + work + f"\nSo {a}+{b}={s}." + _boxed(s, rng, boxed_p)
    if kind == "table":
        more = [(a, b)] + [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(3)]
        return "\n".join(f"{x}+{y}={x + y}" for x, y in more)
    if kind == "qa":
        return f"Question: What is {a} + {b}?\nAnswer: {s}"
    if kind == "question":
        return _question(a, b, rng, 1, 3) + work + f"\nSo {a}+{b}={s}." + _boxed(s, rng, boxed_p)
    if kind == "english":
        return " ".join(rng.sample(ENGLISH, rng.randint(2, 5)))
    if kind == "tagged":
        if rng.random() < random_tags:
            tag = rng.choice(tag_names) if tag_names else pseudo_word(rng)
        else:
            tag = rng.choice(TAGS)
        head = rng.choice(["", f"{a} + {b}:\n", f"Add {a} and {b}.\n", _question(a, b, rng, 0, 2)])
        if random_tags and rng.random() < 0.5:   # the page says what the tag is for before using it
            head = markup_sentence(rng, tag) + "\n" + head
        return (head + f"<{tag}>\n" + work + f"\n</{tag}>\nSo {a}+{b}={s}."
                + _boxed(s, rng, boxed_p))
    raise ValueError(f"unknown document kind {kind!r}; known: {KINDS}")


def base_corpus(n_docs: int, seed: int = 0, mix: dict[str, float] | None = None, boxed_p: float = 0.5,
                context_p: float = 0.6, random_tags: float = 0.0, tag_names: list[str] | None = None) -> list[str]:
    """n_docs documents of the mix (kind -> weight) over train-split additions of two 2-digit numbers."""
    mix = dict(mix or DEFAULT_MIX)
    unknown = sorted(set(mix) - set(KINDS))
    if unknown:
        raise ValueError(f"base corpus mix: unknown kinds {unknown}; known: {list(KINDS)}")
    rng = random.Random(f"pretrain:{seed}")
    pairs = train_pairs()
    kinds, weights = zip(*[(k, w) for k, w in mix.items() if w > 0])
    out = []
    for _ in range(n_docs):
        a, b = rng.choice(pairs)
        kind = rng.choices(kinds, weights)[0]
        d = doc(kind, a, b, rng, boxed_p, random_tags, tuple(t for t in tag_names or () if t != "think"))
        if kind != "english" and rng.random() < context_p:
            # web pages put math after unrelated text: the model learns to find the problem by its content,
            # wherever it is (a long prompt in front of a question must not derail it)
            ctx = rng.sample(ENGLISH, rng.randint(1, 4)) + [markup_sentence(rng) for _ in range(rng.randint(0, 2))]
            rng.shuffle(ctx)
            d = " ".join(ctx) + "\n" + d
        out.append(d)
    check_base_corpus(out)
    return out


FORBIDDEN = ("<think>", "</think>", R1_INSTRUCTION, "A conversation between User and Assistant",
             R1_ZERO_TEMPLATE.split("{problem}")[0][:60], "Assistant:", "User:", "<|im_start|>")


def pack(docs: list[str], eos: str, max_chars: int) -> list[str]:
    """Documents joined with the end-of-text token into sequences of up to ~max_chars characters, as
    pretraining packs its text: the model sees long contexts and learns that a document ends at `eos`."""
    out, cur = [], ""
    for d in docs:
        if cur and len(cur) + len(d) + len(eos) > max_chars:
            out.append(cur)
            cur = ""
        cur = cur + eos + d if cur else d
    if cur:
        out.append(cur)
    return out


def check_base_corpus(docs: list[str]) -> None:
    """Raise ValueError if any document contains the R1 template, its instruction, a think tag or chat markup."""
    for i, d in enumerate(docs):
        for f in FORBIDDEN:
            if f in d:
                raise ValueError(f"base corpus document {i} contains {f!r}: the base model must not see the R1 "
                                 f"protocol")

