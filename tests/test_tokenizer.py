from transformers import AutoTokenizer

from data.prompts import R1_INSTRUCTION, build_prompt
from data.tasks import make_task


def test_roundtrip_task_text(tiny):
    tok = AutoTokenizer.from_pretrained(tiny.tokenizer)
    texts = []
    for name in ("arithmetic", "chain_sum", "countdown"):
        ds = make_task(name, 50, split="test", seed=3)
        texts += list(ds["problem"]) + list(ds["solution"])
    texts += ["unseen text: Ünïcödé ∑ 𝔽 emoji 🙂 \t tabs", R1_INSTRUCTION]
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=True) == t


def test_digits_are_single_tokens(tiny):
    tok = AutoTokenizer.from_pretrained(tiny.tokenizer)
    pieces = tok.convert_ids_to_tokens(tok("12345+678=13023", add_special_tokens=False)["input_ids"])
    assert pieces == list("12345+678=13023")


def test_think_tokens_are_single_and_survive_decoding(tiny):
    tok = AutoTokenizer.from_pretrained(tiny.tokenizer)
    ids = tok("<think>\n1+1=2\n</think>\n\\boxed{2}", add_special_tokens=False)["input_ids"]
    think, end = tok.convert_tokens_to_ids(["<think>", "</think>"])
    assert ids[0] == think and end in ids
    # vLLM decodes with skip_special_tokens=True: the tags must stay for the format reward to see them
    assert tok.decode(ids, skip_special_tokens=True).startswith("<think>\n")
    assert "</think>" in tok.decode(ids, skip_special_tokens=True)


def test_chat_template_qwen_style(tiny):
    tok = AutoTokenizer.from_pretrained(tiny.qwen2)
    text = build_prompt("What is 2 + 3?", tok)
    assert text == f"<|im_start|>user\nWhat is 2 + 3?\n{R1_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
    assert build_prompt("What is 2 + 3?", tok, force_think=True).endswith("<|im_start|>assistant\n<think>\n")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                   tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    toks = tok.convert_ids_to_tokens(ids)
    assert toks.count("<|im_start|>") == 2 and toks.count("<|im_end|>") == 2
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_r1_zero_template_keeps_braces():
    text = build_prompt("Compute 1+2.", template="r1_zero")
    assert "User: Compute 1+2.\n" in text and "\\boxed{}" in text and text.endswith("Assistant: ")
