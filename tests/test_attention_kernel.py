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
