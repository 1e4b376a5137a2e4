"""Prompt templates shared by SFT, GRPO, distillation and evaluation.

Same text everywhere is the point: a model trained with one prompt and evaluated with another reports numbers
nobody can reproduce. The R1 instruction follows DeepSeek-R1's evaluation protocol.
"""
from __future__ import annotations

from typing import Any

R1_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
THINK_PREFIX = "<think>\n"

# R1-Zero's plain-text template (paper, Table 1), for base models without a chat template.
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process is enclosed within <think> </think> tags, i.e., <think> reasoning "
    "process here </think> answer here.\nUser: {problem}\n" + R1_INSTRUCTION + "\nAssistant: "
)


def user_content(problem: str, instruction: str | None = R1_INSTRUCTION) -> str:
    return f"{problem}\n{instruction}" if instruction else problem


def build_messages(problem: str, instruction: str | None = R1_INSTRUCTION,
                   system: str | None = None) -> list[dict[str, str]]:
    """The problem as chat messages (TRL's conversational format)."""
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": user_content(problem, instruction)}]


def build_prompt(problem: str, tokenizer: Any | None = None, *, template: str = "chat",
                 instruction: str | None = R1_INSTRUCTION, system: str | None = None,
                 force_think: bool = False) -> str:
    """Render the prompt text a model is conditioned on.

    template: "chat" applies the tokenizer's chat template (Qwen style) with a generation prompt;
              "r1_zero" uses R1-Zero's plain-text template; "plain" is problem + instruction.
    force_think: append "<think>\\n" so generation starts inside the reasoning block (R1 recommends this
              for distilled models, which otherwise sometimes skip thinking).
    """
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template='chat' needs a tokenizer with a chat_template; use template='r1_zero' "
                             "or 'plain' for base models without one")
        text = tokenizer.apply_chat_template(build_messages(problem, instruction, system), tokenize=False,
                                             add_generation_prompt=True)
    elif template == "r1_zero":
        text = R1_ZERO_TEMPLATE.replace("{problem}", problem)  # not .format: the instruction has braces
    elif template == "plain":
        text = user_content(problem, instruction) + "\n"
    else:
        raise ValueError(f"unknown prompt template {template!r}; allowed: chat, r1_zero, plain")
    if force_think and not text.endswith(THINK_PREFIX):
        text += THINK_PREFIX
    return text
