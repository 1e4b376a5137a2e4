"""Packed rows (rl.packing): the same loss and gradients as one padded row per sequence, and no attention across
the sequences of a row."""
import pytest
import torch

from rl.packing import IGNORE, PackedLMCollator, first_fit_decreasing, pack_examples, padding_share


def tiny_lm(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, max_position_embeddings=256, attn_implementation="sdpa")
    return Qwen2ForCausalLM(cfg).float()


def padded_batch(ids, labels, pad_id=0):
    width = max(map(len, ids))
    inp = torch.full((len(ids), width), pad_id)
    lab = torch.full((len(ids), width), IGNORE)
    am = torch.zeros((len(ids), width), dtype=torch.long)
    for r, (x, y) in enumerate(zip(ids, labels)):
        inp[r, :len(x)], lab[r, :len(y)], am[r, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": inp, "labels": lab, "attention_mask": am}


def loss_and_grads(model, batch):
    model.zero_grad()
    out = model(**batch, use_cache=False)  # a KV cache turns the packed-row detection off (as TRL does)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_first_fit_decreasing_respects_capacity_and_keeps_every_sequence():
    lengths = [5, 90, 40, 60, 10, 100, 130, 1, 33]
    rows = first_fit_decreasing(lengths, 100)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 100 or len(r) == 1 for r in rows)
    assert len(rows) <= 6
    assert padding_share(lengths, 100)[1] < padding_share(lengths, 100)[0]


def test_packed_loss_and_gradients_equal_padded():
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (37, 5, 64, 12, 20, 51, 9)]
    labels = [[t if j >= 2 else IGNORE for j, t in enumerate(x)] for x in ids]  # a "prompt" of 2 tokens
    model = tiny_lm()
    ref_loss, ref_grads = loss_and_grads(model, padded_batch(ids, labels))
    packed = pack_examples(ids, labels, capacity=80, pad_id=0)
    assert packed["input_ids"].shape[0] < len(ids) and "attention_mask" not in packed
    loss, grads = loss_and_grads(model, packed)
    assert torch.allclose(loss, ref_loss, atol=1e-6, rtol=1e-5)
    for n, gr in ref_grads.items():
        assert torch.allclose(grads[n], gr, atol=1e-6, rtol=1e-4), n


def test_a_sequence_never_sees_its_row_neighbours():
    model = tiny_lm().eval()
    ids = [[3, 4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14]]
    a = pack_examples(ids, ids, capacity=16, pad_id=0)
    assert a["input_ids"].shape[0] == 1 and a["input_ids"][0, :5].tolist() == ids[0]  # the longest comes first
    changed = [[50, 60, 70, 80, 90], [8, 9, 10], [11, 12, 13, 14]]
    b = pack_examples(changed, changed, capacity=16, pad_id=0)
    with torch.no_grad():
        la = model(input_ids=a["input_ids"], position_ids=a["position_ids"], use_cache=False).logits
        lb = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
        alone = [model(input_ids=torch.tensor([x]), use_cache=False).logits[0] for x in ids]
    same = (a["input_ids"] == b["input_ids"])[0]
    assert not same.all()
    assert torch.equal(la[0, same], lb[0, same])  # bit-identical where the tokens are the other sequences'
    at = 0
    for x, ref in zip([ids[0], ids[2], ids[1]], [alone[0], alone[2], alone[1]]):  # = each sequence on its own
        assert torch.allclose(la[0, at:at + len(x)], ref, atol=1e-5)
        at += len(x)


def test_collator_reads_trl_labels_and_truncates():
    col = PackedLMCollator(pad_token_id=0, capacity=6)
    out = col([{"input_ids": [1, 2, 3, 4, 5, 6, 7, 8], "labels": [IGNORE, IGNORE, 3, 4, 5, 6, 7, 8]},
               {"input_ids": [9, 10]}])
    assert out["input_ids"].shape[1] == 6
    assert out["labels"].tolist()[0] == [IGNORE, IGNORE, 3, 4, 5, 6]
    assert out["labels"].tolist()[1][:2] == [IGNORE, 10]


def test_sft_stage_trains_with_packing(tmp_path):
    """The SFT stage with train.packing: the same batches and loss as padding (TRL's labels, -100 on the prompt,
    survive packing: the loss curves agree), and it learns."""
    from rl.config import load_config
    from rl.sft.config import SFTStageConfig
    from rl.sft.train import run_sft

    curves = {}
    for packing in ("false", "true"):
        cfg = load_config(SFTStageConfig, "configs/tiny_sft.yaml",
                          [f"output_dir={tmp_path / packing}", "train.max_steps=30", "train.batch_size=8",
                           "train.logging_steps=5", f"train.packing={packing}", "data.num_train=240", "train.lr=3e-3"])
        curves[packing] = run_sft(cfg)["loss_curve"]
    s = curves["true"]
    assert s[-1][1] < 0.7 * s[0][1], s
    assert [step for step, _ in s] == [step for step, _ in curves["false"]]
    for (_, packed), (_, padded) in zip(s, curves["false"]):
        assert packed == pytest.approx(padded, rel=1e-3), (curves["true"], curves["false"])
