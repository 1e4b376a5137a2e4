"""rl.grpo.attention_kernel: SDPA's math kernel for short CPU training micro-batches, flash (PyTorch's choice)
otherwise, with the same attention either way."""
import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from rl.grpo.attention_kernel import training_sdpa


def _attention(length: int, below: int, device: str = "cpu"):
    """Forward and backward of a causal GQA attention over `length` tokens inside training_sdpa's context (each
    pass entered anew, as the trainer does); the kernels the profiler saw, the output and the query's gradient."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, length, 16, generator=g).requires_grad_()
    kv = torch.randn(3, 2, length, 16, generator=g).requires_grad_()
    with profile() as p:
        with training_sdpa(length, torch.device(device), below):
            out = F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
        with training_sdpa(length, torch.device(device), below):
            out.sum().backward()
    names = {e.key for e in p.key_averages()}
    return names, out.detach(), q.grad


@pytest.mark.parametrize("length,below,kernel", [(100, 192, "math"), (191, 192, "math"), (192, 192, "flash"),
                                                 (300, 192, "flash"), (100, 0, "flash")])
def test_short_rows_train_with_the_math_kernel_and_long_ones_with_flash(length, below, kernel):
    names, _, _ = _attention(length, below)
    math = "aten::_scaled_dot_product_attention_math" in names
    flash = "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in names
    assert (math, flash) == ((True, False) if kernel == "math" else (False, True)), sorted(names)


def test_the_math_kernel_computes_the_same_attention_and_gradients():
    _, out_m, grad_m = _attention(64, 192)
    _, out_f, grad_f = _attention(64, 0)
    assert torch.allclose(out_m, out_f, atol=1e-5) and torch.allclose(grad_m, grad_f, atol=1e-5)


def test_other_devices_and_packed_rows_keep_pytorchs_choice():
    import contextlib

    assert isinstance(training_sdpa(100, torch.device("cuda"), 192), contextlib.nullcontext)
    assert isinstance(training_sdpa(0, torch.device("cpu"), 192), contextlib.nullcontext)   # packed / no rows
    assert not isinstance(training_sdpa(100, torch.device("cpu"), 192), contextlib.nullcontext)


def test_config_refuses_a_negative_length():
    from rl.config import ConfigError, load_config
    from rl.grpo.config import GRPOConfig

    with pytest.raises(ConfigError, match="trainer.math_attention_below"):
        load_config(GRPOConfig, "configs/tiny_grpo.yaml", ["trainer.math_attention_below=-1"])
    assert load_config(GRPOConfig, "configs/tiny_grpo.yaml", []).trainer.math_attention_below == 192


def test_the_math_kernel_is_kept_within_its_memory_budget():
    """What the math kernel keeps for the backward (rows x heads x L^2 x 8 bytes, in every layer without gradient
    checkpointing) must fit MATH_BUDGET: the 0.5B shape's 17 x 113 tokens over 24 layers does; a full 8,192-token
    micro-batch of 42 rows of 191 tokens does not (flash), unless one layer at a time keeps it."""
    import contextlib

    from rl.grpo.attention_kernel import MATH_BUDGET, MATH_BYTES_PER_SCORE

    cpu = torch.device("cpu")
    assert not isinstance(training_sdpa(113, cpu, 192, rows=17, heads=14, layers_held=24), contextlib.nullcontext)
    assert isinstance(training_sdpa(191, cpu, 192, rows=42, heads=14, layers_held=24), contextlib.nullcontext)
    assert not isinstance(training_sdpa(191, cpu, 192, rows=42, heads=14, layers_held=1), contextlib.nullcontext)
    assert 42 * 14 * 191**2 * MATH_BYTES_PER_SCORE * 24 > MATH_BUDGET >= 17 * 14 * 113**2 * MATH_BYTES_PER_SCORE * 24


def test_recomputation_under_gradient_checkpointing_runs_the_same_kernel_again():
    """transformers checkpoints with use_reentrant=False: the backward recomputes the forward and checks that it
    saved the same tensors, so the backward must run in the same kernel's context (the trainer enters it again)."""
    from torch.utils.checkpoint import CheckpointError, checkpoint

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 50, 16, generator=g, dtype=torch.bfloat16).requires_grad_()
    kv = torch.randn(2, 2, 50, 16, generator=g, dtype=torch.bfloat16).requires_grad_()
    mask = torch.zeros(50, 50, dtype=torch.bfloat16).masked_fill(~torch.ones(50, 50, dtype=torch.bool).tril(),
                                                                   float("-inf"))

    def attn(q, kv):
        return F.scaled_dot_product_attention(q, kv, kv, attn_mask=mask, enable_gqa=True)

    cpu = torch.device("cpu")
    with profile() as p:
        with training_sdpa(50, cpu, 192):
            out = checkpoint(attn, q, kv, use_reentrant=False)
        with training_sdpa(50, cpu, 192):
            out.float().sum().backward()
    names = {e.key for e in p.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" not in names
    assert "aten::_scaled_dot_product_attention_math" in names and q.grad is not None
    q.grad = None
    with training_sdpa(50, cpu, 192):
        out = checkpoint(attn, q, kv, use_reentrant=False)
    with pytest.raises(CheckpointError):   # recomputed with flash: other saved tensors than the forward's
        out.float().sum().backward()
