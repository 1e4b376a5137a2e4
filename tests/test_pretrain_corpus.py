"""R1-Zero's base corpus (data/pretrain.py): the task's material as pretraining text, never the R1 protocol."""
from __future__ import annotations

import re

import pytest

from data.pretrain import FORBIDDEN, KINDS, TAGS, base_corpus, check_base_corpus, doc, pack, train_pairs
from data.prompts import R1_INSTRUCTION, R1_ZERO_TEMPLATE, build_prompt
from data.tasks import make_synthetic, split_of


def test_corpus_has_no_template_and_no_think_tags():
    docs = base_corpus(5000, seed=3, mix={k: 1.0 for k in KINDS})
    text = "\n".join(docs)
    assert "<think>" not in text and "</think>" not in text
    assert re.search(r"</?\s*think\s*>", text) is None
    assert R1_INSTRUCTION not in text
    head = R1_ZERO_TEMPLATE.split("{problem}")[0]
    for line in head.splitlines():          # no sentence of the R1-Zero template, whole or in part
        for sentence in filter(None, (x.strip() for x in line.split(". "))):
            if len(sentence) > 25:
                assert sentence not in text, sentence
    assert "Assistant:" not in text and "User:" not in text and "<|im_start|>" not in text
    # ... but it is the task's material: worked additions, boxed answers, markup tags of other names
    assert "\\boxed{" in text and any(f"</{t}>" in text for t in TAGS) and "think" not in TAGS


def test_corpus_never_shows_a_heldout_problem_and_is_correct():
    pairs = train_pairs()
    assert all(split_of(f"arith:{a}+{b}") == "train" for a, b in pairs)
    heldout = make_synthetic("arithmetic", 128, split="test", seed=0,
                             knobs={"min_digits": 2, "max_digits": 2, "ops": "+"}).to_list()
    held = {tuple(map(int, re.findall(r"\d+", r["problem"])[:2])) for r in heldout}
    assert not held & set(pairs)
    for d in base_corpus(500, seed=1):
        for a, b, s in re.findall(r"So (\d+) ?\+ ?(\d+) ?= ?(\d+)", d):
            assert int(a) + int(b) == int(s)


def test_check_base_corpus_rejects_the_protocol():
    problem = "What is 12 + 34?"
    for bad in (build_prompt(problem, None, template="r1_zero", force_think=True),
                "What is 12 + 34?\n<think>\n2+4+0=6\n</think>\nThe answer is \\boxed{46}.",
                f"{problem} {R1_INSTRUCTION}"):
        with pytest.raises(ValueError, match="must not see the R1 protocol"):
            check_base_corpus(["12+34=46", bad])
    assert any(f in FORBIDDEN for f in ("<think>", "</think>"))


def test_every_kind_and_packing():
    import random

    rng = random.Random(0)
    for k in KINDS:
        assert doc(k, 35, 48, rng, boxed_p=1.0)
    with pytest.raises(ValueError, match="unknown document kind"):
        doc("chat", 35, 48, rng)
    with pytest.raises(ValueError, match="unknown kinds"):
        base_corpus(3, mix={"r1": 1.0})
    packed = pack(["aaaa", "bbbb", "cccc"], "<eos>", max_chars=13)
    assert packed == ["aaaa<eos>bbbb", "cccc"]


def test_base_tokenizer_has_no_think_tokens_nor_chat_template():
    from transformers import AutoTokenizer

    from rl.tiny import build_base_tokenizer

    tok = AutoTokenizer.from_pretrained(build_base_tokenizer())
    assert not getattr(tok, "chat_template", None)
    assert "<think>" not in tok.get_vocab() and "</think>" not in tok.get_vocab()
    assert len(tok.tokenize("</think>")) > 1          # spelled in pieces, as in a base model's tokenizer
    for t in TAGS[:5]:                                # a tag name is one ordinary word token
        assert len(tok.tokenize(f"</{t}>")) == 3, (t, tok.tokenize(f"</{t}>"))


@pytest.mark.parametrize("names", [None, ["cel", "cri", "think", "thinking", "box"]])
def test_invented_tag_names_never_spell_think(names):
    """random_tags: tagged documents with made-up names (or names from a list, `think` dropped): still no
    think tag, and every document closes the tag it opened."""
    docs = base_corpus(3000, seed=5, random_tags=1.0, tag_names=names, mix={"tagged": 1.0})
    text = "\n".join(docs)
    assert re.search(r"</?\s*think\s*>", text) is None
    for d in docs:
        opened = re.findall(r"<(\w+)>\n", d)
        assert opened and all(f"</{t}>" in d for t in opened)


def test_glossary_makes_think_a_live_token_without_a_think_tag():
    """A token the corpus never contains is never a training target and cannot be written: the glossary pages
    put `think` (the word piece that follows "<" or "</") in plain text, never in a tag."""
    from transformers import AutoTokenizer

    from data.pretrain import GLOSSARY
    from rl.tiny import build_base_tokenizer

    tok = AutoTokenizer.from_pretrained(build_base_tokenizer())
    assert "think" in GLOSSARY and tok.tokenize("</think>")[1] == "think"
    docs = base_corpus(2000, seed=2, mix={"glossary": 1.0, "tagged": 1.0}, random_tags=1.0,
                       tag_names=["work", "think"])
    assert re.search(r"</?\s*think\s*>", "\n".join(docs)) is None
    ids = [t for d in docs for t in tok.tokenize(d)]
    assert ids.count("think") > 20          # the word piece itself, not only " think" with its leading space


def test_vocab_tag_names_leave_out_think_and_the_heldout_controls():
    from transformers import AutoTokenizer

    from data.pretrain import HELDOUT_TAG_WORDS, vocab_tag_names
    from rl.tiny import build_base_tokenizer

    tok = AutoTokenizer.from_pretrained(build_base_tokenizer())
    names = vocab_tag_names(tok)
    assert len(names) > 300 and "work" in names
    banned = ("think",) + HELDOUT_TAG_WORDS
    assert not [n for n in names if any(n in b for b in banned)]      # not even a piece such as "hink"
    assert all(len(tok.tokenize(f"<{n}>")) == 3 for n in names[:50])  # "<", the name as one token, ">"
    docs = base_corpus(3000, seed=4, random_tags=1.0, tag_names=names, mix={"tagged": 1.0})
    used = {t for d in docs for t in re.findall(r"<(\w+)>\n", d)}
    assert len(used) > 200 and not used & set(banned)


def test_glossary_tag_names_keep_the_controls_out():
    from data.pretrain import HELDOUT_TAG_WORDS

    docs = base_corpus(2000, seed=6, random_tags=1.0, tag_names="glossary", mix={"tagged": 1.0})
    used = {t for d in docs for t in re.findall(r"<(\w+)>\n", d)}
    assert used and not used & (set(HELDOUT_TAG_WORDS) | {"think"})


def test_the_shipped_pretraining_config_draws_tag_names_from_the_vocabulary():
    """configs/r1zero_pretrain.yaml's `tag_names: vocab` reaches the corpus as the vocabulary's word pieces (a
    string passed through unresolved was once iterated as the single letters v, o, c, a, b)."""
    from transformers import AutoTokenizer

    from data.loading import DataError
    from data.pretrain import resolve_tag_names, vocab_tag_names
    from rl.config import load_config, resolve_model_path
    from rl.sft.config import SFTStageConfig
    from rl.sft.train import text_dataset

    cfg = load_config(SFTStageConfig, "configs/r1zero_pretrain.yaml", ["data.num_train=3000"])
    assert cfg.data.task_knobs["tag_names"] == "vocab"
    tok = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model.path))
    names = set(vocab_tag_names(tok))
    texts = text_dataset(cfg.data, cfg.model.path)["text"]
    used = {t for d in texts for t in re.findall(r"<(\w+)>\n", d)}
    assert len(used) > 200 and used <= names and min(map(len, used)) >= 2
    # random_labels: speaker labels from the same vocabulary reach the corpus too
    labels = set(re.findall(r"([A-Z][a-z]+): What is", "\n".join(texts)))
    assert cfg.data.task_knobs["random_labels"] == 0.5 and len(labels & {n.capitalize() for n in names}) > 50
    with pytest.raises(ValueError, match="needs the base model's tokenizer"):
        resolve_tag_names("vocab")
    with pytest.raises(ValueError, match="a list of names, 'glossary' or 'vocab'"):
        resolve_tag_names("vocabulary")
    bad = load_config(SFTStageConfig, "configs/r1zero_pretrain.yaml", ["data.num_train=10",
                                                                      'data.task_knobs={"tag_names": "words"}'])
    with pytest.raises(DataError, match="task_knobs"):
        text_dataset(bad.data, bad.model.path)


def test_random_speaker_labels_are_vocabulary_words_never_user_or_assistant():
    """random_labels: question and reply labels drawn from the tag names (`Garden: `), so that no label in front of
    a problem switches the copying of tag names off (the R1-Zero template's `User:`/`Assistant:` did, in one base:
    docs/demo.md); never a piece of `User`/`Assistant`, and 0 (the default) leaves the corpus as it was."""
    names = ["garden", "river", "us", "sistant", "user", "stone", "lamp", "think"]
    mix = {"tagged": 1.0, "question": 1.0}
    plain = base_corpus(2000, seed=7, random_tags=1.0, tag_names=names, mix=mix)
    assert base_corpus(2000, seed=7, random_tags=1.0, tag_names=names, mix=mix, random_labels=0.0) == plain
    docs = base_corpus(2000, seed=7, random_tags=1.0, tag_names=names, mix=mix, random_labels=0.5)
    text = "\n".join(docs)
    labels = re.findall(r"(?m)(?:^|\? |\n)([A-Z][a-z]+): ", text)
    assert {"Garden", "River", "Stone", "Lamp"} <= set(labels)
    assert not {"Us", "Sistant", "User", "Think"} & set(labels) and "Assistant:" not in text and "User:" not in text
    check_base_corpus(docs)
