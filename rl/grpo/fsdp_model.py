"""The trainer's models: HF causal LMs sharded with FSDP2, in mixed precision, that score tokens cheaply.

Mixed precision the way FSDP2 intends (`MixedPrecisionPolicy`):
  - the trainable policy's master weights (and so AdamW's state) are fp32, always: an lr-1e-6 update of a bf16
    weight rounds away on most weights;
  - forward and backward run in `model.dtype` (the compute dtype): FSDP all-gathers the parameters cast to it;
  - gradients are reduce-scattered in fp32.
Frozen models (the KL reference, an on-policy-distillation teacher) have no optimizer: they are loaded straight
in the compute dtype.

`TokenLogprobModel` wraps the HF model so that its forward returns per-token log-probs (and entropies) of the
scored positions only, computed in chunks from the final hidden states (`rl.algos.logprobs`): the
[tokens x vocab] logits never exist whole. The wrapper is the FSDP root, so the LM head's weight is gathered
during its forward and autograd's backward, like any other FSDP parameter.
"""
from __future__ import annotations

import torch
from torch import nn

from rl.algos.logprobs import DEFAULT_CHUNK, chunked_token_logprobs, scatter_positions

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
WRAPPER_PREFIX = "lm."   # state-dict keys of the wrapper: "lm." + the HF model's own keys


def compute_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


class TokenLogprobModel(nn.Module):
    """forward(input_ids, attention_mask, score_mask) -> (logp [B, L], entropy [B, L] or None).

    score_mask [B, L] is 1 at positions t >= 1 whose token should be scored: logp[b, t] = log p(x_t | x_<t) at
    the sampling temperature; 0 elsewhere. Only those positions reach the LM head."""

    def __init__(self, lm: nn.Module, chunk: int = DEFAULT_CHUNK) -> None:
        super().__init__()
        self.lm = lm
        self.chunk = chunk
        cfg = self.hf.config
        for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
            if getattr(cfg, attr, None) not in (None, 1, 1.0):
                raise NotImplementedError(f"{cfg.model_type}: config.{attr}={getattr(cfg, attr)} transforms the "
                                          "logits after the LM head; r1lab's token scorer does not support it yet")

    @property
    def hf(self) -> nn.Module:
        """The HF PreTrainedModel (under PEFT: the base model with the adapters injected)."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, score_mask: torch.Tensor,
                temperature: float = 1.0, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden = self.hf.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pos = score_mask[:, 1:].nonzero()                      # (row, t - 1): hidden t-1 predicts token t
        h = hidden[pos[:, 0], pos[:, 1]]
        targets = input_ids[pos[:, 0], pos[:, 1] + 1]
        head = self.hf.get_output_embeddings()
        lp, ent = chunked_token_logprobs(h, head.weight, targets, temperature=temperature, bias=head.bias,
                                         chunk=self.chunk, with_entropy=with_entropy)
        where = pos + torch.tensor([0, 1], device=pos.device)
        shape = (input_ids.shape[0], input_ids.shape[1])
        return scatter_positions(lp, where, shape), (scatter_positions(ent, where, shape) if ent is not None else None)


def load_model(path: str, mc, device: torch.device, mesh, *, trainable: bool, chunk: int = DEFAULT_CHUNK
               ) -> TokenLogprobModel:
    """An FSDP2-sharded TokenLogprobModel of the HF model at `path`.

    trainable: fp32 master weights with the mixed-precision policy of `mc.dtype` (and LoRA adapters when
    mc.lora_r > 0); frozen: weights in the compute dtype, eval mode, no gradients."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoModelForCausalLM

    dtype = compute_dtype(mc.dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32 if trainable else dtype,
                                                 trust_remote_code=mc.trust_remote_code)
    model.to(device)
    if trainable and mc.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    lora = trainable and getattr(mc, "lora_r", 0) > 0
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=mc.lora_r, lora_alpha=mc.lora_alpha,
                                                 target_modules=list(mc.lora_targets), task_type="CAUSAL_LM"))
    wrapper = TokenLogprobModel(model, chunk=chunk)
    mp = (MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
          if trainable and dtype != torch.float32 else MixedPrecisionPolicy())
    for layer in wrapper.hf.get_decoder().layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(wrapper, mesh=mesh, mp_policy=mp)
    if not trainable:
        wrapper.eval()
        wrapper.requires_grad_(False)
    return wrapper


def hf_key(name: str) -> str:
    """Wrapper state-dict key -> the HF model's key (LoRA keys keep PEFT's names; see hf_io.merge_lora_state)."""
    return name[len(WRAPPER_PREFIX):] if name.startswith(WRAPPER_PREFIX) else name
