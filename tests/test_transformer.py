"""Stage-two model: token layout, training-only corruption, sampling, completion, guidance, save/load."""

import pytest
import torch

from checkpoints import save_checkpoint
from mingpt import GPT_PRESETS
from transformer import (TransformerConfig, VQGANTransformer, guided_logits, load_transformer, model_dict)
from vqgan import VQGAN, config_from_preset



def tiny_model(image_size=16, **kw) -> VQGANTransformer:
    """A random tiny VQGAN (16px -> 8x8 = 64 tokens, 64 codes) and a tiny GPT."""
    torch.manual_seed(0)
    vqgan = VQGAN(config_from_preset("tiny", image_size=image_size))
    return VQGANTransformer(vqgan, TransformerConfig(**GPT_PRESETS["tiny"], **kw))


def test_shapes_and_token_layout():
    model = tiny_model()
    assert model.latent_hw == (8, 8) and model.num_tokens == 64 and model.gpt.block_size == 64
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    idx = model.encode_to_indices(x)
    assert idx.shape == (3, 64) and idx.dtype == torch.long
    assert model.indices_to_image(idx).shape == (3, 3, 16, 16)
    assert model.indices_to_image(idx.view(3, 8, 8)).shape == (3, 3, 16, 16)
    logits, targets = model(idx)
    assert logits.shape == (3, 64, model.num_codes) and torch.equal(targets, idx)
    assert model.loss(idx).ndim == 0


def test_raster_order_matches_vqgan_indices():
    model = tiny_model()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    _, grid, _ = model.vqgan.encode(x)  # (B, h, w)
    seq = model.encode_to_indices(x)
    assert torch.equal(seq[:, 8:16], grid[:, 1])  # row 1 is tokens 8..15


def test_sos_and_class_tokens_outside_code_range():
    model = tiny_model(num_classes=3)
    K = model.num_codes
    assert model.sos_token == K and model.vocab_size == K + 1 + 3
    assert model.start_tokens(2).flatten().tolist() == [K, K]
    assert model.start_tokens(3, torch.tensor([0, 1, 2])).flatten().tolist() == [K + 1, K + 2, K + 3]
    with pytest.raises(ValueError):
        model.start_tokens(1, torch.tensor([3]))
    with pytest.raises(ValueError):
        tiny_model().start_tokens(1, torch.tensor([0]))  # unconditional model


def test_first_input_is_the_start_token_not_code_zero():
    model = tiny_model().eval()
    seen = {}
    model.gpt.register_forward_pre_hook(lambda m, args: seen.setdefault("tokens", args[0]))
    idx = torch.zeros(2, 64, dtype=torch.long)  # all code 0: the reference's SOS would be invisible
    model(idx)
    assert seen["tokens"][:, 0].tolist() == [model.sos_token] * 2
    assert torch.equal(seen["tokens"][:, 1:], idx[:, :-1])


def test_pkeep_and_label_drop_only_in_training():
    model = tiny_model(pkeep=0.5, num_classes=2, cfg_dropout=0.5)
    seen = []
    model.gpt.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    idx = torch.randint(0, model.num_codes, (8, 64))
    labels = torch.ones(8, dtype=torch.long)
    model.eval()
    model(idx, labels)
    model(idx, labels)
    assert torch.equal(seen[0], seen[1])
    assert torch.equal(seen[0][:, 1:], idx[:, :-1]) and (seen[0][:, 0] == model.num_codes + 2).all()
    model.train()
    assert not model.vqgan.training  # the VQGAN stays frozen in eval mode
    torch.manual_seed(1)
    _, targets = model(idx, labels)
    corrupted = seen[2]
    assert torch.equal(targets, idx)  # targets are never corrupted
    changed = (corrupted[:, 1:] != idx[:, :-1]).float().mean().item()
    assert 0.3 < changed < 0.6  # ~ (1 - pkeep) * (1 - 1/K)
    assert (corrupted[:, 1:] < model.num_codes).all()  # noise is codes only
    dropped = corrupted[:, 0] == model.sos_token
    assert dropped.any() and (~dropped).any()


def test_generate_shapes_range_and_seed():
    model = tiny_model()
    a = model.generate(3, seed=5)
    b = model.generate(3, seed=5)
    assert a.shape == (3, 64) and torch.equal(a, b)
    assert 0 <= a.min() and a.max() < model.num_codes
    assert not torch.equal(a, model.generate(3, seed=6))
    assert model.sample(2, seed=0, top_k=5, top_p=0.9).shape == (2, 3, 16, 16)
    assert model.training  # generate restores the mode it found


def test_cached_and_uncached_generation_agree():
    model = tiny_model().eval()
    prefix = torch.randint(0, model.num_codes, (2, 10))
    greedy_cached = model.generate(2, temperature=0, prefix=prefix)
    greedy_full = model.generate(2, temperature=0, prefix=prefix, use_cache=False)
    assert torch.equal(greedy_cached, greedy_full)
    sampled_cached = model.generate(2, seed=3, top_k=10)
    sampled_full = model.generate(2, seed=3, top_k=10, use_cache=False)
    assert torch.equal(sampled_cached, sampled_full)


@pytest.mark.parametrize("n_prefix", [0, 2, 10])
def test_cache_agrees_for_taming_layout_with_n_unmasked(monkeypatch, n_prefix):
    """Taming's n_unmasked prefix attends both ways, so keys cached before it is complete go stale:
    cached sampling must give the uncached logits at every step (it recomputes until the prefix is
    whole), with and without a kept prefix shorter than n_unmasked."""
    import transformer

    torch.manual_seed(0)
    vqgan = VQGAN(config_from_preset("tiny", image_size=16))
    model = VQGANTransformer(vqgan, TransformerConfig(**GPT_PRESETS["tiny"], token_layout="taming",
                                                      vocab_size=64, sos_token=0, n_unmasked=5)).eval()
    for w in model.gpt.parameters():  # larger weights than at init: peaky attention, so differences show
        if w.dim() > 1:
            torch.nn.init.normal_(w, std=0.3)
    seen = []

    def record(logits, *args, **kwargs):
        seen.append(logits.clone())
        return logits.argmax(-1, keepdim=True)

    monkeypatch.setattr(transformer, "sample_next_token", record)
    prefix = torch.randint(0, 64, (2, n_prefix), generator=torch.Generator().manual_seed(1))
    runs = {}
    for use_cache in (True, False):
        seen.clear()
        runs[use_cache] = (model.generate(2, prefix=prefix, use_cache=use_cache), list(seen))
    assert torch.equal(runs[True][0], runs[False][0])
    assert len(runs[True][1]) == 64 - n_prefix
    for a, b in zip(runs[True][1], runs[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("keep_fraction", [0.5, 0.25])
def test_completion_keeps_the_given_rows_exactly(keep_fraction):
    model = tiny_model()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    idx = model.encode_to_indices(x)
    n = model.num_kept(keep_fraction)
    assert n == int(8 * keep_fraction) * 8
    out = model.complete_indices(idx, keep_fraction, seed=0)
    assert out.shape == idx.shape and torch.equal(out[:, :n], idx[:, :n])
    assert not torch.equal(out[:, n:], idx[:, n:])  # the rest is sampled, not copied
    # images in, images out; the same codes are kept
    assert model.complete(x, keep_fraction, seed=0).shape == x.shape
    assert torch.equal(model.indices_to_image(out), model.complete(idx, keep_fraction, seed=0))


def test_guidance_scale_one_equals_conditional_sampling():
    model = tiny_model(num_classes=2)
    labels = torch.tensor([0, 1, 1])
    cond = model.generate(3, labels=labels, seed=7)
    # run the doubled (cond + uncond) batch path at scale 1: it must sample the same tokens
    start, uncond = model.start_tokens(3, labels), model.start_tokens(3)
    empty = torch.empty(3, 0, dtype=torch.long)
    doubled = model._sample_tokens(start, uncond, empty, 1.0, 1.0, None, None,
                                   torch.Generator().manual_seed(7), True)
    assert torch.equal(cond, doubled)
    guided = model.generate(3, labels=labels, seed=7, cfg_scale=4.0)
    assert guided.shape == (3, 64) and guided.max() < model.num_codes
    c, u = torch.randn(2, 5), torch.randn(2, 5)
    assert torch.equal(guided_logits(c, u, 1.0), c)
    assert torch.allclose(guided_logits(c, u, 3.0), u + 3.0 * (c - u))


def test_guidance_with_cache_matches_without():
    model = tiny_model(num_classes=2).eval()
    labels = torch.tensor([1, 0])
    a = model.generate(2, labels=labels, cfg_scale=2.5, temperature=0)
    b = model.generate(2, labels=labels, cfg_scale=2.5, temperature=0, use_cache=False)
    assert torch.equal(a, b)


def test_tiny_gpt_overfits_one_code_sequence():
    model = tiny_model()
    idx = torch.randint(0, model.num_codes, (1, 64), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.gpt.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        loss = model.loss(idx)
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
    assert torch.equal(model.generate(1, temperature=0), idx)


def test_save_and_load_transformer(tmp_path):
    torch.manual_seed(0)
    model = VQGANTransformer(VQGAN(config_from_preset("tiny", image_size=16)),
                             TransformerConfig(**GPT_PRESETS["tiny"], num_classes=2), ["cats", "dogs"])
    path = tmp_path / "t.pt"
    save_checkpoint(model_dict(model), path)
    torch.load(path, weights_only=True)  # plain dict, safe to load
    loaded = load_transformer(path)
    assert not loaded.training and loaded.class_names == ["cats", "dogs"]
    assert loaded.latent_hw == model.latent_hw and loaded.vocab_size == model.vocab_size
    labels = torch.tensor([0, 1])
    assert torch.equal(loaded.generate(2, seed=1, labels=labels), model.generate(2, seed=1, labels=labels))
    model.eval()
    idx = torch.randint(0, 64, (2, 64))
    assert torch.equal(loaded(idx)[0], model(idx)[0])
    save_checkpoint({"kind": "vqgan"}, tmp_path / "v.pt")
    with pytest.raises(ValueError, match="not a stage-two checkpoint"):
        load_transformer(tmp_path / "v.pt")


def test_latent_grid_follows_the_vqgan():
    model = tiny_model(image_size=24)  # tiny VQGAN: f = 2
    assert model.latent_hw == (12, 12) and model.gpt.block_size == 144
    assert model.sample(1, seed=0).shape == (1, 3, 24, 24)
