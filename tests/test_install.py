"""The install keeps the CUDA torchvision/torchaudio/torchcodec builds out: transformers and vllm import."""
import subprocess
import sys


def test_transformers_and_vllm_import_in_a_fresh_interpreter():
    code = ("import transformers, vllm, trl, peft, ray, math_verify; "
            "from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
