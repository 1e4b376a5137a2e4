"""Training prompts for GRPO: the dataset, its tokenised prompts and a resumable cursor."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from data.loading import DataError
from data.prompts import build_prompt
from rl.config import DataConfig


def load_train_rows(dc: DataConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train rows, held-out rows). Synthetic sources give a disjoint held-out split; files give none."""
    if dc.source.startswith("synthetic:"):
        from data.tasks import make_synthetic

        name = dc.source.split(":", 1)[1]
        train = make_synthetic(name, dc.num_train, split="train", seed=dc.seed, knobs=dc.task_knobs)
        test = make_synthetic(name, dc.num_eval, split="test", seed=dc.seed, knobs=dc.task_knobs) if dc.num_eval else None
        return train.to_list(), (test.to_list() if test is not None else [])
    from data.loading import load_dataset

    ds = load_dataset(dc.source, split=dc.split, field_map=dc.field_map)
    return ds.to_list(), []


def tokenize_prompts(rows: list[dict[str, Any]], tokenizer, dc: DataConfig, origin: str) -> list[list[int]]:
    out = []
    for i, r in enumerate(rows):
        text = build_prompt(str(r["problem"]), tokenizer, template=dc.template, force_think=dc.force_think)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > dc.max_prompt_tokens:
            raise DataError(f"{origin}: row {i}: prompt is {len(ids)} tokens, above data.max_prompt_tokens="
                            f"{dc.max_prompt_tokens}")
        out.append(ids)
    return out


@dataclass
class Cursor:
    """Position in the shuffled training order: epoch e uses permutation(seed + e); `pos` prompts consumed."""
    seed: int
    size: int
    epoch: int = 0
    pos: int = 0

    def _order(self) -> list[int]:
        order = list(range(self.size))
        random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            order = self._order()
            k = min(n - len(out), self.size - self.pos)
            out += order[self.pos: self.pos + k]
            self.pos += k
            if self.pos >= self.size:
                self.epoch, self.pos = self.epoch + 1, 0
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}
