"""Does an R1-Zero base model copy tag names under the R1-Zero template? (docs/demo.md, 2026-12-07)

For each context in front of a problem, the mean over 6 additions of p(name | context, "<name>\\n", the column
steps, "</"): `think` (what R1-Zero needs, never a tag in the corpus), `work` (a tag name seen thousands of
times), `believe` and `know` (held-out controls, never tags). GRPO amplified the protocol from bases with
p(think | whole template) >= ~2% and never from ~0.03%. A few seconds on CPU:

    .venv/bin/python bench/r1zero_probe.py runs/demo/r1zero/base/final
"""
from __future__ import annotations

import argparse

PAIRS = [(39, 11), (47, 28), (56, 37), (23, 45), (68, 19), (81, 14)]
WORDS = ("think", "work", "believe", "know")


def contexts():
    from data.prompts import R1_INSTRUCTION, R1_ZERO_TEMPLATE, build_prompt

    pre = R1_ZERO_TEMPLATE.split("\nUser:")[0]
    return {"whole R1-Zero template": lambda q: build_prompt(q, template="r1_zero"),
            "preamble + plain question": lambda q: pre + "\n" + q + "\n",
            "User/Assistant labels + instruction": lambda q: f"User: {q}\n{R1_INSTRUCTION}\nAssistant: ",
            "User/Assistant labels": lambda q: f"User: {q}\nAssistant: ",
            "Q:/A: labels + instruction": lambda q: f"Q: {q}\n{R1_INSTRUCTION}\nA: ",
            "plain question": lambda q: q + "\n"}


def probe(model, tok, word: str, ctx) -> float:
    import torch

    from data.pretrain import column_lines

    tid = tok(word, add_special_tokens=False).input_ids[0]
    ps = []
    for a, b in PAIRS:
        text = ctx(f"What is {a} + {b}?") + f"<{word}>\n" + column_lines(a, b) + "\n</"   # as the corpus writes it
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            ps.append(model(ids).logits[0, -1].softmax(-1)[tid].item())
    return sum(ps) / len(ps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="an HF directory of a base model with the base tokenizer")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    for name, ctx in contexts().items():
        print(f"{name:38s}", "  ".join(f"{w} {probe(model, tok, w, ctx):.4f}" for w in WORDS), flush=True)


if __name__ == "__main__":
    main()
