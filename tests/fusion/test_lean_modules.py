"""Lean building blocks: the function of the torch modules they replace, on tiny inputs."""

import pytest
import torch
from torch import nn

from fusion.modules import Attention, Dropout, dropout
from fusion.registry import HyperparameterError

torch.set_num_threads(1)


def _pair(d=16, heads=4, p=0.1):
    torch.manual_seed(0)
    old = nn.MultiheadAttention(d, heads, dropout=p, batch_first=True)
    torch.manual_seed(0)
    new = Attention(d, heads, dropout=p)
    return old, new


def test_attention_draws_and_names_the_weights_as_multihead_attention():
    old, new = _pair()
    assert list(new.state_dict()) == list(old.state_dict())
    for key, value in old.state_dict().items():
        assert torch.equal(new.state_dict()[key], value), key
    other = Attention(16, 4)
    other.load_state_dict(old.state_dict())  # saved models of the old layer load


def test_attention_gives_multihead_attentions_outputs_and_gradients():
    old, new = _pair(p=0.0)
    x, context = torch.randn(3, 7, 16), torch.randn(3, 5, 16)
    for mode in (False, True):
        old.train(mode)
        new.train(mode)
        torch.testing.assert_close(new(x), old(x, x, x, need_weights=False)[0])
        torch.testing.assert_close(new(x, context), old(x, context, context, need_weights=False)[0])
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ca, cb = context.clone().requires_grad_(), context.clone().requires_grad_()
    (old(xa, xa, xa, need_weights=False)[0].square().sum()
     + old(xa, ca, ca, need_weights=False)[0].square().sum()).backward()
    (new(xb).square().sum() + new(xb, cb).square().sum()).backward()
    torch.testing.assert_close(xb.grad, xa.grad)
    torch.testing.assert_close(cb.grad, ca.grad)
    grads = dict(old.named_parameters())
    for name, parameter in new.named_parameters():
        torch.testing.assert_close(parameter.grad, grads[name].grad, msg=name)


def test_attention_with_dropout_runs_the_same_math_and_drops_weights():
    old, new = _pair()
    x, context = torch.randn(2, 6, 16), torch.randn(2, 4, 16)
    old.eval()
    new.train()
    new.dropout = 1e-9  # the training path with (almost surely) nothing dropped
    torch.testing.assert_close(new(x, context), old(x, context, context, need_weights=False)[0])
    new.dropout = 0.5
    torch.manual_seed(1)
    first = new(x)
    torch.manual_seed(1)
    assert torch.equal(new(x), first), "the same generator state draws the same masks"
    assert not torch.allclose(new(x), first), "another draw drops other weights"
    new.eval()
    torch.testing.assert_close(new(x), old(x, x, x, need_weights=False)[0])


def test_attention_refuses_a_width_the_heads_do_not_divide():
    with pytest.raises(HyperparameterError, match="divisible by n_heads"):
        Attention(10, 4)


def test_dropout_drops_at_the_rate_and_scales_the_rest():
    x = torch.ones(200_000)
    torch.manual_seed(0)
    out = dropout(x, 0.1, True)
    assert abs(float((out == 0).float().mean()) - 0.1) < 0.005
    keep_rate = 1 - round(0.1 * 2**15) / 2**15  # the drop rate is p rounded to 2**-15
    assert abs(keep_rate - 0.9) < 2**-16
    assert torch.allclose(out[out != 0], torch.full_like(out[out != 0], 1 / keep_rate))
    torch.manual_seed(0)
    assert torch.equal(dropout(x, 0.1, True), out)
    assert dropout(x, 0.1, False) is x and dropout(x, 0.0, True) is x
    leaf = x.clone().requires_grad_()
    torch.manual_seed(0)
    dropout(leaf, 0.1, True).sum().backward()
    assert torch.equal(leaf.grad, out), "the gradient passes where the value passed, scaled alike"


@pytest.mark.parametrize("p", [0.5, 0.1, 0.003])
def test_keep_masks_are_independent_draws_at_the_rate(p):
    from fusion.modules import keep_mask

    torch.manual_seed(0)
    mask, keep_rate = keep_mask((1001, 401), p)  # not a multiple of four elements
    assert mask.shape == (1001, 401) and mask.dtype == torch.bool
    assert 0 < keep_rate <= 1 and abs((1 - keep_rate) - p) <= 2**-16
    rate = float(mask.float().mean())
    assert abs(rate - keep_rate) < 4 * (keep_rate * (1 - keep_rate) / mask.numel()) ** 0.5 + 1e-6
    if 0.01 < keep_rate < 0.99:
        # the four draws taken from one 64-bit number are independent: each position of the
        # four keeps at the rate, and neighbours agree as often as independent draws do
        flat = mask.flatten()[: mask.numel() // 4 * 4].view(-1, 4).float()
        for k in range(4):
            assert abs(float(flat[:, k].mean()) - keep_rate) < 0.01
        both = float((flat[:, 0] * flat[:, 1]).mean())
        assert abs(both - keep_rate**2) < 0.01


def test_keep_masks_keep_something_for_p_near_one():
    from fusion.modules import keep_mask

    mask, keep_rate = keep_mask((8,), 0.9999999)
    assert keep_rate == 2**-15, "the highest drop rate is 1 - 2**-15, so the scale stays finite"


def test_dropout_keeps_the_mean():
    x = torch.full((400_000,), 3.0)
    for p in (0.1, 0.3):
        torch.manual_seed(1)
        assert abs(float(dropout(x, p, True).mean()) - 3.0) < 0.02


def test_dropout_module_is_an_nn_dropout_with_the_lean_mask():
    layer = Dropout(0.25)
    assert isinstance(layer, nn.Dropout) and not layer.state_dict()
    x = torch.randn(4, 8)
    torch.manual_seed(3)
    drawn = layer(x)
    torch.manual_seed(3)
    assert torch.equal(drawn, dropout(x, 0.25, True))
    assert torch.equal(layer.eval()(x), x)


def _dense_tail(drop_rate=0.0):
    """A two-layer DenseNet tail built as encoders.cxr.map_tail builds the real one."""
    from collections import OrderedDict

    from torchxrayvision.models import _DenseBlock

    torch.manual_seed(0)
    block = _DenseBlock(num_layers=2, num_input_features=6, bn_size=2, growth_rate=4,
                        drop_rate=drop_rate)
    stages = nn.Sequential(OrderedDict(denseblock4=block, norm5=nn.BatchNorm2d(14)))
    for norm in stages.modules():  # batch norms away from the identity, as trained ones are
        if isinstance(norm, nn.BatchNorm2d):
            norm.weight.data.uniform_(0.5, 1.5)
            norm.bias.data.uniform_(-0.5, 0.5)
    tail = nn.Sequential(stages, nn.ReLU())
    tail.out_channels = 14
    return tail


@pytest.mark.parametrize("cells", [(2, 2), (1, 2), (1, 1), (3, 3)])
def test_dense_tail_gives_the_dense_blocks_outputs_gradients_and_statistics(cells):
    import copy

    from fusion.modules import DenseTail, channels_last

    old = _dense_tail()
    new = channels_last(DenseTail(copy.deepcopy(old)))
    assert list(new.state_dict()) == list(old.state_dict()) and new.out_channels == 14
    x = torch.randn(5, 6, *cells)
    for mode in (True, False):
        old.train(mode)
        new.train(mode)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_old, out_new = old(xa), new(xb)
        torch.testing.assert_close(out_new, out_old)
        out_old.square().sum().backward()
        out_new.square().sum().backward()
        # training batch norm amplifies the rounding of the gradients (values up to about 70)
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-4)
    grads = dict(old.named_parameters())
    for name, parameter in new.named_parameters():
        torch.testing.assert_close(parameter.grad, grads[name].grad, rtol=1e-4, atol=1e-4, msg=name)
    for name, buffer in old.state_dict().items():  # running statistics updated alike
        torch.testing.assert_close(new.state_dict()[name], buffer, msg=name)


def test_dense_tail_takes_only_plain_dense_tails():
    from fusion.modules import DenseTail

    assert DenseTail.fits(_dense_tail())
    assert not DenseTail.fits(_dense_tail(drop_rate=0.2))
    assert not DenseTail.fits(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()))
    with pytest.raises(HyperparameterError, match="DenseNet tail"):
        DenseTail(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()))
