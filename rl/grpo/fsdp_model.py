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

Two input layouts: padded rows [B, L] with an attention mask (`trainer.packing=false`), or one packed row [1, T]
(`attention_mask=None`, with `position_ids` restarting per sequence and `cu_seqlens`; `rl.packing.PackedLayout`)
run through the packed attention of `rl.grpo.sequence_parallel`, which also splits the row over the
sequence-parallel group `sp` (each rank runs its T/k tokens and scores the tokens they predict; the log-probs are
all-gathered so every rank of the group returns the whole row).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rl.algos.logprobs import DEFAULT_CHUNK, chunked_token_logprobs, scatter_positions
from rl.grpo.sequence_parallel import PackedAttention, SPGroup, gather_seq

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
WRAPPER_PREFIX = "lm."   # state-dict keys of the wrapper: "lm." + the HF model's own keys


def compute_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


class TokenLogprobModel(nn.Module):
    """forward(input_ids, attention_mask, score_mask) -> (logp [B, L], entropy [B, L] or None).

    score_mask [B, L] is 1 at positions t >= 1 whose token should be scored: logp[b, t] = log p(x_t | x_<t) at
    the sampling temperature; 0 elsewhere. Only those positions reach the LM head."""

    def __init__(self, lm: nn.Module, chunk: int = DEFAULT_CHUNK, sp: SPGroup | None = None) -> None:
        super().__init__()
        self.lm = lm
        self.chunk = chunk
        self.sp = sp or SPGroup()
        cfg = self.hf.config
        for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
            if getattr(cfg, attr, None) not in (None, 1, 1.0):
                raise NotImplementedError(f"{cfg.model_type}: config.{attr}={getattr(cfg, attr)} transforms the "
                                          "logits after the LM head; r1lab's token scorer does not support it yet")

    @property
    def hf(self) -> nn.Module:
        """The HF PreTrainedModel (under PEFT: the base model with the adapters injected)."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, score_mask: torch.Tensor,
                temperature: float = 1.0, with_entropy: bool = False, *, position_ids: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Padded rows (attention_mask [B, L]) or, with attention_mask None, one packed row [1, T] with
        position_ids [1, T] and cu_seqlens (T a multiple of the sequence-parallel size)."""
        if attention_mask is None:
            return self._forward_packed(input_ids, score_mask, temperature, with_entropy, position_ids, cu_seqlens)
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

    def _forward_packed(self, ids, score_mask, temperature, with_entropy, position_ids, cu_seqlens):
        """One packed row; this rank runs tokens [lo, lo + n) and scores the tokens t in (lo, lo + n] they
        predict; gathered over the sequence-parallel group into [1, T] (logp[0, t] = log p(x_t | x_<t))."""
        if position_ids is None or cu_seqlens is None or ids.shape[0] != 1:
            raise ValueError("a packed forward takes one row [1, T] with position_ids and cu_seqlens")
        sp, T = self.sp, ids.shape[1]
        if T % sp.size:
            raise ValueError(f"packed row of {T} tokens is not a multiple of sequence_parallel={sp.size}")
        n = T // sp.size
        lo = sp.rank * n
        bounds = cu_seqlens.to(torch.long)
        ctx = PackedAttention(cu_seqlens=cu_seqlens, max_len=int((bounds[1:] - bounds[:-1]).max()), sp=sp)
        hidden = self.hf.get_decoder()(input_ids=ids[:, lo:lo + n], position_ids=position_ids[:, lo:lo + n],
                                       use_cache=False, r1lab_packed=ctx).last_hidden_state[0]
        if ctx.calls == 0:
            raise RuntimeError(f"{type(self.hf).__name__} does not route attention through transformers' attention "
                               "interface, so packed rows would attend across sequences: set trainer.packing=false")
        j = score_mask[0, lo + 1:lo + n + 1].nonzero()[:, 0]     # hidden lo+j predicts token lo+j+1
        head = self.hf.get_output_embeddings()
        lp, ent = chunked_token_logprobs(hidden[j], head.weight, ids[0, lo + 1 + j], temperature=temperature,
                                         bias=head.bias, chunk=self.chunk, with_entropy=with_entropy)

        def row(values):   # this rank's [n] (index: predicting position) -> the row's [1, T] (index: token)
            local = values.new_zeros(n).index_put((j,), values)
            return F.pad(gather_seq(local, sp)[:-1], (1, 0))[None]
        return row(lp), (row(ent) if ent is not None else None)


def load_model(path: str, mc, device: torch.device, mesh, *, trainable: bool, chunk: int = DEFAULT_CHUNK,
               packing: bool = False, sp: SPGroup | None = None, release_heap: bool = False) -> TokenLogprobModel:
    """An FSDP2-sharded TokenLogprobModel of the HF model at `path`.

    trainable: fp32 master weights with the mixed-precision policy of `mc.dtype` (and LoRA adapters when
    mc.lora_r > 0); frozen: weights in the compute dtype, eval mode, no gradients. packing: attention through
    rl.grpo.sequence_parallel's packed attention (packed rows only), split over the group `sp`. release_heap: on
    CPU, each unit's gradient reduce first gives the heap's freed memory back (rl/heap.py)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoModelForCausalLM

    dtype = compute_dtype(mc.dtype)
    extra = {}
    if packing:
        from rl.grpo.sequence_parallel import register_packed_attention

        extra["attn_implementation"] = register_packed_attention()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32 if trainable else dtype,
                                                 trust_remote_code=mc.trust_remote_code, **extra)
    model.to(device)
    if trainable and mc.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    lora = trainable and getattr(mc, "lora_r", 0) > 0
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=mc.lora_r, lora_alpha=mc.lora_alpha,
                                                 target_modules=list(mc.lora_targets), task_type="CAUSAL_LM"))
    wrapper = TokenLogprobModel(model, chunk=chunk, sp=sp)
    mp = (MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
          if trainable and dtype != torch.float32 else MixedPrecisionPolicy())
    units = [fully_shard(layer, mesh=mesh, mp_policy=mp) for layer in wrapper.hf.get_decoder().layers]
    units.append(fully_shard(wrapper, mesh=mesh, mp_policy=mp))
    if trainable and mesh.get_group().name() == "gloo":
        # gloo's reduce-scatter is an all-reduce, and a CPU backward leaves freed heap resident: see there
        from rl.grpo.reduce_scatter import install

        for unit in units:
            install(unit, trim_heap=release_heap and device.type == "cpu")
    if not trainable:
        wrapper.eval()
        wrapper.requires_grad_(False)
    return wrapper


def hf_key(name: str) -> str:
    """Wrapper state-dict key -> the HF model's key (LoRA keys keep PEFT's names; see hf_io.merge_lora_state)."""
    return name[len(WRAPPER_PREFIX):] if name.startswith(WRAPPER_PREFIX) else name
