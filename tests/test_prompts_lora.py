"""Unit tests of the method building blocks: prompt selection and placement, prefix attention, LoRA, SCE."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from slca_cli.errors import SlcaError
from slca_cli.methods import prompts as P
from slca_cli.methods.lora import LoRALinear, inject_lora, lora_layers
from slca_cli.methods.losses import reverse_cross_entropy, symmetric_cross_entropy
from slca_cli.methods.slcapp import inference_scales, shrink_old_samples


def tiny_vit(depth=2):
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=depth, num_heads=4, mlp_ratio=2.0,
                             num_classes=0).eval()


def test_select_prompts_is_top_k_by_cosine_similarity():
    rng = np.random.default_rng(0)
    queries, keys = rng.normal(size=(7, 12)), rng.normal(size=(10, 12))
    indices, similarity = P.select_prompts(torch.tensor(queries), torch.tensor(keys) * 5.0, top_k=3)
    cos = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ \
        (keys / np.linalg.norm(keys, axis=1, keepdims=True)).T
    np.testing.assert_allclose(similarity.numpy(), cos, atol=1e-12)
    assert indices.tolist() == np.argsort(-cos, axis=1)[:, :3].tolist()
    loss = P.matching_loss(similarity, indices)
    expected = np.mean([np.sum(1 - cos[b, np.argsort(-cos[b])[:3]]) for b in range(7)])
    assert math.isclose(float(loss), expected, rel_tol=1e-9)


def test_l2p_inserts_the_selected_prompts_after_the_class_token():
    vit = tiny_vit()
    model = P.L2PBackbone(vit, pool_size=6, length=3, top_k=2)
    images = torch.randn(4, 3, 16, 16)
    seen = {}
    vit.blocks[0].register_forward_pre_hook(lambda module, args: seen.update(tokens=args[0]))  # the last pass
    features = model(images)
    assert features.shape == (4, 32)
    tokens = seen["tokens"]
    assert tokens.shape == (4, 1 + 2 * 3 + 16, 32)
    query = vit.forward_features(images)[:, 0]
    expected_idx, _ = P.select_prompts(query, model.prompt_keys, 2)
    assert model.last_selection.tolist() == expected_idx.tolist()
    for b in range(4):
        want = model.prompts[expected_idx[b]].reshape(6, 32)
        assert torch.equal(tokens[b, 1:7], want)
    patches = vit._pos_embed(vit.patch_embed(images))
    assert torch.equal(tokens[:, :1], patches[:, :1]) and torch.equal(tokens[:, 7:], patches[:, 1:])


def test_l2p_features_depend_only_on_selected_prompts_and_keys_get_the_matching_gradient():
    vit = tiny_vit()
    model = P.L2PBackbone(vit, pool_size=6, length=3, top_k=2).train()
    images = torch.randn(1, 3, 16, 16)
    before = model(images)
    chosen = set(model.last_selection[0].tolist())
    other = next(i for i in range(6) if i not in chosen)
    with torch.no_grad():  # a random change (a constant shift would vanish in the pre-norms)
        model.prompts[other] += torch.randn(3, 32)
    assert torch.equal(model(images), before)
    with torch.no_grad():
        model.prompts[next(iter(chosen))] += torch.randn(3, 32)
    assert not torch.allclose(model(images), before)
    model.matching_loss.backward()
    grad_rows = model.prompt_keys.grad.abs().sum(dim=1)
    assert all(grad_rows[i] > 0 for i in chosen) and grad_rows[other] == 0


def test_prefix_attention_matches_attention_over_concatenated_keys_and_values():
    vit = tiny_vit()
    attn = vit.blocks[0].attn
    x, prefix = torch.randn(2, 5, 32), torch.randn(2, 2, 3, 32)
    out = P.prefix_attention(attn, x, prefix)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 4, 8).permute(2, 0, 3, 1, 4)
    pk = prefix[:, 0].reshape(2, 3, 4, 8).transpose(1, 2)
    pv = prefix[:, 1].reshape(2, 3, 4, 8).transpose(1, 2)
    k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    want = attn.proj((weights @ v).transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, attn(x))  # the prefix changes the result


def test_dualprompt_prefixes_go_to_blocks_1_2_and_3_to_5(monkeypatch):
    vit = tiny_vit(depth=6)
    g_layers, e_layers = P.dualprompt_layers(6)
    assert (g_layers, e_layers) == ((0, 1), (2, 3, 4))
    model = P.DualPromptBackbone(vit, pool_size=4, e_length=3, g_length=2, g_layers=g_layers, e_layers=e_layers)
    calls = []
    original = P.block_with_prefix
    monkeypatch.setattr(P, "block_with_prefix",
                        lambda block, x, prefix: calls.append((block, prefix)) or original(block, x, prefix))
    images = torch.randn(3, 3, 16, 16)
    features = model.eval()(images)
    assert features.shape == (3, 32)
    layers = [list(vit.blocks).index(block) for block, _ in calls]
    assert layers == [0, 1, 2, 3, 4]
    chosen = model.last_selection[:, 0]
    for (block, prefix), layer in zip(calls, layers):
        if layer in g_layers:
            assert prefix.shape == (3, 2, 2, 32)
            assert torch.equal(prefix[1], model.g_prompts[g_layers.index(layer)])
        else:
            assert prefix.shape == (3, 2, 3, 32)
            for b in range(3):
                assert torch.equal(prefix[b], model.e_prompts[e_layers.index(layer), chosen[b]])


def test_dualprompt_trains_the_task_prompt_and_tests_with_key_matching():
    vit = tiny_vit()
    model = P.DualPromptBackbone(vit, pool_size=4, e_length=2, g_length=2, g_layers=(0,), e_layers=(1,))
    images = torch.randn(5, 3, 16, 16)
    query = vit.forward_features(images)[:, 0]
    with torch.no_grad():
        model.prompt_keys.copy_(-query.mean(0).expand(4, -1))
        model.prompt_keys[3] = query.mean(0)
    model.eval()(images)
    assert model.last_selection[:, 0].tolist() == [3] * 5
    model.train()
    model.train_task = 1
    features = model(images)
    assert model.last_selection[:, 0].tolist() == [1] * 5
    (features.sum() + model.matching_loss).backward()
    assert model.prompt_keys.grad[1].abs().sum() > 0 and model.prompt_keys.grad[3].abs().sum() == 0
    assert model.e_prompts.grad[0, 1].abs().sum() > 0 and model.e_prompts.grad[0, 3].abs().sum() == 0


def test_lora_linear_adds_a_scaled_low_rank_update():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    layer = LoRALinear(base, rank=2, scale=0.8)
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), base(x))  # B starts at zero
    with torch.no_grad():
        layer.lora_B.normal_()
    want = x @ (base.weight + 0.8 * layer.lora_B @ layer.lora_A).T + base.bias
    torch.testing.assert_close(layer(x), want)
    layer.init_from_svd()
    _, _, vh = np.linalg.svd(base.weight.detach().numpy())
    np.testing.assert_allclose(np.abs(layer.lora_A.detach().numpy()), np.abs(vh[:2]), atol=1e-5)


def test_inject_lora_wraps_qkv_fc1_fc2_of_every_block():
    vit = tiny_vit(depth=3)
    images = torch.randn(2, 3, 16, 16)
    before = vit(images)
    layers = inject_lora(vit, rank=4, scale=0.8)
    assert len(layers) == 9 and len(list(lora_layers(vit))) == 9
    assert isinstance(vit.blocks[2].attn.qkv, LoRALinear) and isinstance(vit.blocks[0].mlp.fc2, LoRALinear)
    torch.testing.assert_close(vit(images), before)


def test_a_lora_rank_above_the_layer_width_is_refused():
    with pytest.raises(SlcaError, match=r"--lora-rank 33 is above the 32 inputs"):
        inject_lora(tiny_vit(), rank=33, scale=0.8)
    assert len(inject_lora(tiny_vit(), rank=32, scale=0.8)) == 6


def test_symmetric_cross_entropy_matches_numpy():
    rng = np.random.default_rng(1)
    logits, targets = rng.normal(size=(6, 4)), rng.integers(0, 4, 6)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ce = -np.log(p[np.arange(6), targets]).mean()
    onehot = np.clip(np.eye(4)[targets], 1e-4, 1)
    rce = -(np.clip(p, 1e-7, 1) * np.log(onehot)).sum(1).mean()
    lt, tt = torch.tensor(logits), torch.tensor(targets)
    assert math.isclose(float(reverse_cross_entropy(lt, tt)), rce, rel_tol=1e-9)
    assert math.isclose(float(symmetric_cross_entropy(lt, tt, 0.5, 0.5)), 0.5 * ce + 0.5 * rce, rel_tol=1e-9)
    assert math.isclose(float(symmetric_cross_entropy(lt, tt, 1.0, 0.0)), float(F.cross_entropy(lt, tt)))


def test_old_class_samples_shrink_by_their_task_distance():
    features = torch.ones(6, 3, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    class_task = torch.tensor([0, 0, 1, 1, 2, 2])
    out = shrink_old_samples(features, labels, class_task, current_task=2, mu=0.02,
                             generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[4:], features[4:])
    for row, gap in zip(out[:4, 0].tolist(), [2, 2, 1, 1]):
        assert 1 / (1 + 0.03 * gap) <= row <= 1 / (1 + 0.01 * gap)
    assert inference_scales([10, 10, 10], 0.02) == pytest.approx([1.04, 1.02, 1.0])
