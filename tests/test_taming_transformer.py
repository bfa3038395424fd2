"""transformer.load_transformer on taming-transformers Net2NetTransformer checkpoints (taming layout).

Fake checkpoints are built with taming's key names (helpers from test_taming_compat); sampling is
checked against a minimal re-statement of taming's `Net2NetTransformer.sample` (no-cache path) over an
independent re-statement of taming's minGPT forward (explicit mask buffer, softmax attention).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from checkpoints import save_checkpoint
from test_taming_compat import (TINY_PARAMS, random_state_dict, taming_gpt_shapes, taming_vq_shapes,
                                write_run)
from transformer import load_transformer, model_dict

# A 4x4 code grid (resolution 8, one downsampling) so the GPT sees 16 tokens: block_size 16.
DD = {**TINY_PARAMS["ddconfig"], "resolution": 8, "attn_resolutions": [4]}
GPT_CFG = dict(vocab_size=16, block_size=16, n_layer=2, n_head=2, n_embd=16)


def make_run(root, cond, **extra):
    sd = random_state_dict(taming_gpt_shapes(**GPT_CFG), seed=5)
    T = GPT_CFG["block_size"]
    for i in range(GPT_CFG["n_layer"]):
        sd[f"transformer.blocks.{i}.attn.mask"] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
    sd["transformer.tok_emb.weight"] = torch.randn(GPT_CFG["vocab_size"], GPT_CFG["n_embd"])  # peaky logits
    vq = random_state_dict(taming_vq_shapes(DD, 16, 4), seed=6)
    sd.update({"first_stage_model." + k: v for k, v in vq.items()})
    cfg = {"target": "taming.models.cond_transformer.Net2NetTransformer", "params": {
        "cond_stage_key": "class_label", **extra,
        "transformer_config": {"target": "taming.modules.transformer.mingpt.GPT", "params": dict(GPT_CFG)},
        "first_stage_config": {"target": "taming.models.vqgan.VQModel",
                               "params": {**TINY_PARAMS, "ddconfig": DD,
                                          "lossconfig": {"target": "taming.modules.losses.DummyLoss"}}},
        "cond_stage_config": cond}}
    return write_run(root, sd, cfg), sd


def ref_gpt(sd, idx, n_head):
    """taming's minGPT forward, restated: logits (B, t, V) for tokens idx (B, t)."""
    p = "transformer."
    x = sd[p + "tok_emb.weight"][idx] + sd[p + "pos_emb"][:, : idx.shape[1]]
    B, T, C = x.shape
    lin = lambda x, n: F.linear(x, sd[n + ".weight"], sd.get(n + ".bias"))  # noqa: E731
    ln = lambda x, n: F.layer_norm(x, (C,), sd[n + ".weight"], sd[n + ".bias"])  # noqa: E731
    for i in range(GPT_CFG["n_layer"]):
        b = f"{p}blocks.{i}."
        h = ln(x, b + "ln1")
        q, k, v = (lin(h, b + "attn." + n).view(B, T, n_head, C // n_head).transpose(1, 2)
                   for n in ("query", "key", "value"))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(sd[b + "attn.mask"][:, :, :T, :T] == 0, float("-inf")).softmax(-1)
        x = x + lin((att @ v).transpose(1, 2).reshape(B, T, C), b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, b + "ln2"), b + "mlp.0")), b + "mlp.2")
    return F.linear(F.layer_norm(x, (C,), sd[p + "ln_f.weight"], sd[p + "ln_f.bias"]), sd[p + "head.weight"])


def ref_sample(sd, c, steps, temperature=1.0, top_k=None):
    """taming's Net2NetTransformer.sample without cache: global RNG, full-vocabulary logits."""
    x = c
    for _ in range(steps):
        x_cond = x if x.size(1) <= GPT_CFG["block_size"] else x[:, -GPT_CFG["block_size"]:]
        logits = ref_gpt(sd, x_cond, GPT_CFG["n_head"])[:, -1, :] / temperature
        if top_k is not None:
            v, _ = torch.topk(logits, top_k)
            logits = logits.clone()
            logits[logits < v[:, [-1]]] = -float("inf")
        probs = F.softmax(logits, dim=-1)
        ix = torch.multinomial(probs, num_samples=1)
        x = torch.cat((x, ix), dim=1)
    return x[:, c.shape[1]:]


def check_gpt_weights(model, sd):
    gsd = model.gpt.state_dict()
    file_keys = {k[len("transformer."):] for k in sd if k.startswith("transformer.") and not k.endswith("attn.mask")}
    assert set(gsd) == file_keys
    for k, v in gsd.items():
        assert torch.equal(v, sd["transformer." + k]), k


@pytest.mark.parametrize("top_k", [5, None])
def test_unconditional_taming_checkpoint_samples_as_taming(tmp_path, top_k):
    path, sd = make_run(tmp_path / "ffhq", "__is_unconditional__", sos_token=0, unconditional=True)
    model = load_transformer(path)
    assert model.taming and model.sos_token == 0 and model.vocab_size == 16 and model.num_tokens == 16
    assert not model.training and model.num_classes == 0
    check_gpt_weights(model, sd)
    assert model.start_tokens(2).tolist() == [[0], [0]]
    # our GPT forward = taming's maths, on the full vocabulary
    idx = torch.randint(0, 16, (2, 16))
    assert torch.allclose(model.gpt(idx)[0], ref_gpt(sd, idx, 2), atol=1e-5)
    torch.manual_seed(7)
    ref = ref_sample(sd, torch.zeros(3, 1, dtype=torch.long), 16, top_k=top_k)
    for use_cache in (True, False):
        torch.manual_seed(7)
        ours = model.generate(3, temperature=1.0, top_k=top_k, use_cache=use_cache)
        assert torch.equal(ours, ref), use_cache
    assert model.sample(1, top_k=top_k, seed=0).shape == (1, 3, 8, 8)


def test_class_conditional_taming_checkpoint_samples_as_taming(tmp_path):
    cond = {"target": "taming.modules.util.Labelator", "params": {"n_classes": 10}}
    path, sd = make_run(tmp_path / "cin", cond)
    model = load_transformer(path)
    assert model.taming and model.num_classes == 10 and model.vocab_size == 16
    check_gpt_weights(model, sd)
    labels = torch.tensor([7, 9, 0])
    assert model.start_tokens(3, labels).tolist() == [[7], [9], [0]]  # class id itself
    torch.manual_seed(11)
    ref = ref_sample(sd, labels[:, None], 16, top_k=5)
    torch.manual_seed(11)
    assert torch.equal(model.generate(3, top_k=5, labels=labels), ref)
    with pytest.raises(ValueError, match="class-conditional"):
        model.generate(1)
    with pytest.raises(ValueError, match="guidance"):
        model.generate(1, labels=[1], cfg_scale=2.0)
    # loss over the full head, as taming's forward + cross-entropy
    codes = torch.randint(0, 16, (2, 16))
    logits, targets = model(codes, labels[:2])
    ref_logits = ref_gpt(sd, torch.cat([labels[:2, None], codes[:, :-1]], 1), 2)
    assert torch.allclose(logits, ref_logits, atol=1e-5) and torch.equal(targets, codes)


def test_taming_layout_round_trips_through_our_checkpoint(tmp_path):
    path, _ = make_run(tmp_path / "ffhq", "__is_unconditional__", sos_token=3, unconditional=True)
    model = load_transformer(path)
    save_checkpoint(model_dict(model), tmp_path / "ours.pt")
    again = load_transformer(tmp_path / "ours.pt")
    assert again.taming and again.sos_token == 3
    assert torch.equal(again.generate(2, seed=1, top_k=5), model.generate(2, seed=1, top_k=5))


def test_sample_script_reads_taming_checkpoints(tmp_path, capsys):
    import sample_transformer
    from cli import UserError

    cond = {"target": "taming.modules.util.Labelator", "params": {"n_classes": 10}}
    path, _ = make_run(tmp_path / "cin", cond)
    args = ["--transformer-path", str(path), "--out-dir", str(tmp_path / "o"), "--num-samples", "2",
            "--device", "cpu"]
    with pytest.raises(UserError, match="class-label"):
        sample_transformer.main(args)
    out = sample_transformer.main(args + ["--class-label", "3", "--top-k", "5"])
    assert len(out["images"]) == 2
