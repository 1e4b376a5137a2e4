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
  glossary  a dictionary page, "think: to use the mind to form ideas ...": ordinary words at the start of a line
Some worked documents end with "The answer is \\boxed{83}." as math text does. Documents are separated by the
tokenizer's end-of-text token when the corpus is tokenized, so the model learns that a document stops.
`check_base_corpus` asserts what the base model must not have seen (tested).

Closing `<think>` is what the base model must do unprompted, and it never saw that tag: it has to *copy* the
name of the open tag, and it can only write a token it was trained to predict. Hence (docs/demo.md, "R1-Zero"):
`random_tags` = share of tagged documents whose tag name is drawn from `tag_names` (a list; "vocab": every
lowercase word piece of the base tokenizer, `vocab_tag_names`; "glossary": the glossary's words) or invented
(`pseudo_word`), `think` and the held-out control words (HELDOUT_TAG_WORDS) always left out, so that closing a
tag is learned as copying its name rather than recalling known pairs; the glossary kind makes `think` a live
token, seen in plain text only. `random_labels` = share of question/reply labels that are words of the same list
(`Garden: `; never a piece of `User`/`Assistant`): in one base the template's `User:`/`Assistant:` labels alone
switched the copying off (docs/demo.md, 2026-12-07), so labels must not be a closed set either.
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
# A glossary (dictionary page, word list): each word starts a line, so its BPE token without a leading space is
# a live token, as in web text, where "think" follows "(", '"', "#", a newline or "<" countless times. A token
# the corpus never contains is never a training target, and next-token training drives its logit down: the
# base model could not write `</think>` however well it copied tag names (measured: p(think | "</") = 0.0002).
GLOSSARY = {
    "think": "to use the mind to form ideas or to decide", "work": "effort spent to make or do something",
    "reason": "a cause or an explanation", "mind": "the part of a person that thinks and feels",
    "answer": "what is said or written in reply to a question", "question": "a sentence that asks for an answer",
    "idea": "a thought or a plan", "plan": "a set of steps decided in advance", "note": "a short written record",
    "check": "to look again to be sure", "solve": "to find the answer to a problem", "sum": "the result of adding",
    "carry": "to move a digit to the next column", "digit": "one of the signs 0 to 9", "step": "one stage of a process",
    "proof": "an argument that shows something is true", "draft": "a first version of a text",
    "guess": "an answer given without being sure", "hint": "a small piece of help", "trace": "a mark left behind",
    "method": "a way of doing something", "logic": "the study of correct reasoning", "memo": "a short message",
    "sketch": "a quick rough drawing", "test": "a way to find out if something works", "try": "to make an attempt",
    "table": "a piece of furniture, or rows and columns of data", "list": "items written one after another",
    "page": "one side of a sheet of paper", "line": "a long thin mark, or a row of text", "text": "written words",
    "box": "a container with flat sides", "card": "a piece of stiff paper", "book": "pages bound together",
    "story": "an account of events", "river": "a large stream of water", "market": "a place to buy and sell",
    "bread": "a food made of flour and water", "music": "sounds arranged in time", "door": "a way into a room",
    "room": "a space inside a building", "friend": "a person you like and trust", "map": "a drawing of an area",
    "train": "a line of railway cars", "coffee": "a hot drink made from beans", "morning": "the early part of the day",
    "evening": "the late part of the day", "teacher": "a person who helps others learn", "student": "a person who learns",
    "puzzle": "a problem made for fun", "riddle": "a puzzling question", "chapter": "a part of a book",
    "article": "a piece of writing in a paper", "process": "a series of actions", "speak": "to say words",
    "write": "to put words on paper", "read": "to look at words and understand them", "learn": "to gain knowledge",
    "count": "to say numbers in order", "add": "to put numbers together", "total": "the whole amount",
    "result": "what comes at the end", "final": "coming last", "first": "coming before all others",
    "second": "coming after the first", "number": "a word or sign for an amount", "problem": "a question to solve",
    "example": "one case that shows a rule", "rule": "what must be done", "order": "the way things follow",
    "change": "to make different", "remember": "to keep in mind", "believe": "to hold as true",
    "wonder": "to want to know", "decide": "to make a choice", "explain": "to make clear", "show": "to let be seen",
    "feel": "to sense", "know": "to be sure of", "see": "to notice with the eyes", "ask": "to put a question",
    "reply": "an answer", "summary": "a short statement of the main points", "detail": "a small part",
    "brief": "short", "aside": "a remark to the side", "quote": "words repeated from another", "code": "a set of signs",
}
# Glossary words that are never tag names (besides think): the control for "copies an unseen tag name"
HELDOUT_TAG_WORDS = ("believe", "wonder", "remember", "decide", "explain", "feel", "know", "speak", "learn", "see")
KINDS = ("prose", "lines", "table", "qa", "tagged", "question", "english", "glossary")
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


NEVER_TAGS = ("think",) + HELDOUT_TAG_WORDS   # never a tag name, whatever list the names come from


def vocab_tag_names(tokenizer) -> list[str]:
    """Tag names from a tokenizer's vocabulary: every lowercase ASCII word piece without a leading space (as it
    follows "<" in markup), minus `think`, the held-out control words and any piece inside them (`hink`), so
    that closing those tags can only be learned as copying. Web markup has thousands of tag names; hundreds of
    single-token names, each rare, make a copy circuit cheaper for a tiny model than memorising the pairs."""
    return sorted(w for w in tokenizer.get_vocab() if w.isascii() and w.isalpha() and w.islower() and len(w) >= 2
                  and not any(w in b for b in NEVER_TAGS))


def resolve_tag_names(tag_names: list[str] | str | None, tokenizer=None) -> tuple[str, ...]:
    """The tag-name list a corpus draws from: a list as given, "glossary" (the glossary's words) or "vocab"
    (`vocab_tag_names`, needs the tokenizer); NEVER_TAGS always dropped. Any other string is an error (it would
    otherwise be iterated as single letters)."""
    if isinstance(tag_names, str):
        if tag_names == "glossary":
            tag_names = list(GLOSSARY)
        elif tag_names == "vocab":
            if tokenizer is None:
                raise ValueError("base corpus: tag_names='vocab' needs the base model's tokenizer")
            tag_names = vocab_tag_names(tokenizer)
        else:
            raise ValueError(f"base corpus: tag_names={tag_names!r}; a list of names, 'glossary' or 'vocab'")
    return tuple(t for t in tag_names or () if t not in NEVER_TAGS)


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


def column_lines(a: int, b: int) -> str:
    """The column steps as `x+y+c=s` lines, as the corpus writes them (no newline after the last)."""
    return "\n".join(f"{x}+{y}+{c}={t}" for x, y, c, t in column_steps(a, b))


def _boxed(total: int, rng: random.Random, p: float) -> str:
    return f" The answer is \\boxed{{{total}}}." if rng.random() < p else ""


def _question(a: int, b: int, rng: random.Random, min_sentences: int, max_sentences: int,
              label_names: tuple[str, ...] = (), random_labels: float = 0.0) -> str:
    """A labelled question, some English after it, and the label of the reply (ends where the work starts). With
    probability `random_labels` each label is a word of `label_names` (`Garden: `), as forums and chats name
    their speakers: the model learns that no label changes what follows it (`User:` / `Assistant:` never)."""
    def label(known: tuple[str, ...]) -> str:
        if label_names and rng.random() < random_labels:
            return rng.choice(label_names).capitalize() + ": "
        return rng.choice(known)

    return (label(Q_LABELS) + f"What is {a} + {b}? "
            + " ".join(rng.sample(ENGLISH, rng.randint(min_sentences, max_sentences))) + "\n" + label(A_LABELS))


def label_names_from(names: tuple[str, ...]) -> tuple[str, ...]:
    """Speaker labels from tag names: never a piece of the R1 template's `User` / `Assistant`."""
    return tuple(n for n in names if len(n) > 2 and n not in "user" and n not in "assistant")


def doc(kind: str, a: int, b: int, rng: random.Random, boxed_p: float = 0.5, random_tags: float = 0.0,
        tag_names: tuple[str, ...] = (), random_labels: float = 0.0, labels: tuple[str, ...] = ()) -> str:
    s = a + b
    steps = column_steps(a, b)
    work = column_lines(a, b)
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
        return _question(a, b, rng, 1, 3, labels, random_labels) + work + f"\nSo {a}+{b}={s}." + _boxed(s, rng, boxed_p)
    if kind == "english":
        return " ".join(rng.sample(ENGLISH, rng.randint(2, 5)))
    if kind == "glossary":
        words = rng.sample(sorted(GLOSSARY), rng.randint(3, 6))
        return rng.choice(["Glossary\n", "Word list\n", "Vocabulary:\n", ""]) + "\n".join(
            rng.choice(["{w}: {d}.", "{w} - {d}.", "{w} ({d})"]).format(w=w, d=GLOSSARY[w]) for w in words)
    if kind == "tagged":
        if rng.random() < random_tags:
            tag = rng.choice(tag_names) if tag_names else pseudo_word(rng)
        else:
            tag = rng.choice(TAGS)
        head = rng.choice(["", f"{a} + {b}:\n", f"Add {a} and {b}.\n", _question(a, b, rng, 0, 2, labels, random_labels)])
        if random_tags and rng.random() < 0.5:   # the page says what the tag is for before using it
            head = markup_sentence(rng, tag) + "\n" + head
        return (head + f"<{tag}>\n" + work + f"\n</{tag}>\nSo {a}+{b}={s}."
                + _boxed(s, rng, boxed_p))
    raise ValueError(f"unknown document kind {kind!r}; known: {KINDS}")


def base_corpus(n_docs: int, seed: int = 0, mix: dict[str, float] | None = None, boxed_p: float = 0.5,
                context_p: float = 0.6, random_tags: float = 0.0, tag_names: list[str] | str | None = None,
                random_labels: float = 0.0,
                tokenizer=None) -> list[str]:
    """n_docs documents of the mix (kind -> weight) over train-split additions of two 2-digit numbers
    (tag_names, tokenizer: `resolve_tag_names`)."""
    mix = dict(mix or DEFAULT_MIX)
    unknown = sorted(set(mix) - set(KINDS))
    if unknown:
        raise ValueError(f"base corpus mix: unknown kinds {unknown}; known: {list(KINDS)}")
    rng = random.Random(f"pretrain:{seed}")
    pairs = train_pairs()
    names = resolve_tag_names(tag_names, tokenizer)
    kinds, weights = zip(*[(k, w) for k, w in mix.items() if w > 0])
    labels = label_names_from(names) if random_labels else ()   # speaker labels (`random_labels`)
    out = []
    for _ in range(n_docs):
        a, b = rng.choice(pairs)
        kind = rng.choices(kinds, weights)[0]
        d = doc(kind, a, b, rng, boxed_p, random_tags, names, random_labels, labels)
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

