"""A small byte-level BPE tokenizer trained locally on the task corpus (no hub download).

Design choices, from measurements on tiny models: digits are split one per token (as Qwen2 and Llama 3 do)
because number-merging BPE made arithmetic much slower to learn; byte-level BPE means any text round-trips.
`<think>`/`</think>` are single added tokens that are *not* special, so decoding with
skip_special_tokens=True (vLLM's default) keeps them in the text the rewards read.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

PAD, BOS_CHAT, EOS_CHAT = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS_CHAT, EOS_CHAT]
THINK_TOKENS = ["<think>", "</think>"]

# Qwen-style chat template (ChatML). No default system prompt: tiny models should not spend tokens on one.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def corpus_extra() -> list[str]:
    """Text beyond the tasks, so prompts of the R1 template and common math text tokenize compactly."""
    from data.prompts import R1_INSTRUCTION, R1_ZERO_TEMPLATE

    return [R1_INSTRUCTION, R1_ZERO_TEMPLATE, "The answer is \\boxed{42}.", "\\frac{1}{2} \\sqrt{3} \\pi",
            "0123456789 + - * / = ( ) [ ] { } , . ? ! : ; < > ^ _ $ % # & ' \" \\ | ~ `",
            "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ"]


def train_tokenizer(corpus: Iterable[str], out_dir: str | Path, *, vocab_size: int = 512,
                    model_max_length: int = 2048, base: bool = False) -> Path:
    """Train and save (HF format: tokenizer.json + tokenizer_config.json) into out_dir.

    base=True: a *base model's* tokenizer, as Qwen2.5's base tokenizer has no think tokens: `<think>` and
    `</think>` are not single tokens (text spells them in BPE pieces), there is no chat template, and the end
    of a document is the end-of-text token."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\d"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=PAD if base else EOS_CHAT, pad_token=PAD, bos_token=None, unk_token=None,
        model_max_length=model_max_length, clean_up_tokenization_spaces=False,
    )
    if not base:
        fast.add_tokens(THINK_TOKENS, special_tokens=False)
        fast.chat_template = CHAT_TEMPLATE
    out = Path(out_dir)
    fast.save_pretrained(out)
    return out


FILLER = "<|r1lab_unused_{}|>"


def pad_tokenizer(src_dir: str | Path, out_dir: str | Path, vocab_size: int) -> Path:
    """Copy of the tokenizer whose ids cover 0..vocab_size-1: filler entries are added to the BPE vocabulary.

    No merge produces them, so encoding is unchanged; each decodes to its own text, so a randomly initialised
    model with a real vocabulary size (Qwen2.5: 151,936) can sample any id and vLLM can detokenize it."""
    import json
    import shutil

    from transformers import AutoTokenizer

    src, out = Path(src_dir), Path(out_dir)
    have = len(AutoTokenizer.from_pretrained(str(src)))
    if vocab_size < have:
        raise ValueError(f"vocab_size {vocab_size} is below the tokenizer's {have} tokens")
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    spec = json.loads((src / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    for t in spec.get("added_tokens", []):  # else `tokenizers` re-numbers them after the (now larger) vocab
        vocab.setdefault(t["content"], t["id"])
    used = set(vocab.values())
    for i in range(vocab_size):
        if i not in used:
            vocab[FILLER.format(i)] = i
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    return out
