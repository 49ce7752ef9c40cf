"""AdaptFormer-style adapters (methods/adapters.py): a fresh adapter leaves the ViT unchanged, each adapter changes
only the forward passes it is active in, and a saved state dict rebuilds the adapters alone."""
import pytest
import torch
from torch import nn

from slca_cli import backbones
from slca_cli.errors import SlcaError
from slca_cli.methods.adapters import (AdaptedBlock, active_adapters, adapter_count, adapter_parameters,
                                       adapted_blocks, inject_adapters, set_active)


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return backbones.get_backbone("vit-tiny-test").build(None, False).eval()


def images(n=3):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def perturb(vit, index):
    """Give adapter ``index`` non-zero up-projections (as training would)."""
    with torch.no_grad():
        for p in adapter_parameters(vit, index):
            p.add_(torch.randn_like(p) * 0.5)


def test_fresh_adapters_leave_every_output_unchanged():
    vit = tiny_vit()
    x = images()
    before = vit(x)
    blocks = inject_adapters(vit, bottleneck=8, scale=0.1, count=3)
    assert len(blocks) == len(vit.blocks) and all(isinstance(b, AdaptedBlock) for b in vit.blocks)
    assert adapter_count(vit) == 3
    for choice in (None, 0, 2, [0, 1, 2]):
        set_active(vit, choice)
        torch.testing.assert_close(vit(x), before, rtol=0, atol=0)
    block = vit.blocks[0].adapters[1]
    assert torch.equal(block.up.weight, torch.zeros_like(block.up.weight)) and float(block.down.weight.detach().abs().sum()) > 0


def test_each_adapter_changes_only_the_passes_it_is_active_in():
    vit = tiny_vit()
    x = images()
    inject_adapters(vit, bottleneck=8, scale=0.1, count=2)
    set_active(vit, None)
    plain = vit(x)
    perturb(vit, 1)
    set_active(vit, 0)
    torch.testing.assert_close(vit(x), plain, rtol=0, atol=0)  # adapter 0 is still fresh
    set_active(vit, 1)
    second = vit(x)
    assert (second - plain).abs().max() > 1e-4
    with active_adapters(vit, None):
        torch.testing.assert_close(vit(x), plain, rtol=0, atol=0)
    assert all(b.active == (1,) for b in adapted_blocks(vit))  # restored after the with block
    with active_adapters(vit, [0, 1]):
        torch.testing.assert_close(vit(x), second, rtol=0, atol=0)  # 0 adds nothing yet


def test_the_adapter_is_scale_times_up_relu_down_beside_the_mlp():
    vit = tiny_vit()
    block = vit.blocks[0]
    x = torch.randn(2, 5, int(vit.embed_dim))
    inject_adapters(vit, bottleneck=4, scale=0.1, count=1)
    perturb(vit, 0)
    set_active(vit, 0)
    adapter = vit.blocks[0].adapters[0]
    mid = x + block.attn(block.norm1(x))
    want = mid + block.mlp(block.norm2(mid)) + 0.1 * adapter.up(torch.relu(adapter.down(mid)))
    torch.testing.assert_close(vit.blocks[0](x), want)


def test_only_the_chosen_adapter_gets_gradients():
    """A fresh adapter's up-projection gets a gradient at once (its down-projection only once up is non-zero)."""
    vit = tiny_vit()
    inject_adapters(vit, bottleneck=8, scale=0.1, count=2)
    vit.requires_grad_(False)
    for p in adapter_parameters(vit, 1):
        p.requires_grad_(True)
    set_active(vit, 1)
    vit(images()).square().sum().backward()
    ups = [b.adapters[1].up.weight.grad for b in adapted_blocks(vit)]
    assert all(g is not None and float(g.abs().sum()) > 0 for g in ups)
    assert all(p.grad is None for p in adapter_parameters(vit, 0))


def test_a_state_dict_rebuilds_the_adapters_in_a_fresh_vit():
    vit = tiny_vit()
    inject_adapters(vit, bottleneck=8, scale=0.1, count=2)
    perturb(vit, 0)
    state = vit.state_dict()
    assert "blocks.0.adapters.1.up.weight" in state and "blocks.0.block.attn.qkv.weight" in state
    fresh = tiny_vit(seed=5)
    inject_adapters(fresh, bottleneck=8, scale=0.1, count=2)
    fresh.load_state_dict(state)
    set_active(vit, 0)
    set_active(fresh, 0)
    torch.testing.assert_close(fresh(images()), vit(images()), rtol=0, atol=0)


def test_bad_uses_are_one_line_errors():
    vit = tiny_vit()
    with pytest.raises(SlcaError, match="count >= 1"):
        inject_adapters(vit, bottleneck=8, scale=0.1, count=0)
    inject_adapters(vit, bottleneck=8, scale=0.1, count=2)
    with pytest.raises(SlcaError, match="adapter index 2 does not exist"):
        set_active(vit, 2)
    with pytest.raises(SlcaError, match="already injected"):
        inject_adapters(vit, bottleneck=8, scale=0.1)
    with pytest.raises(SlcaError, match="transformer blocks"):
        inject_adapters(nn.Sequential(nn.Linear(3, 3)), bottleneck=8, scale=0.1)
