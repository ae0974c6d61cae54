"""Lean building blocks: the same function as the torch modules they replace, checked on tiny inputs."""

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
    old(xa, xa, xa, need_weights=False)[0].square().sum().backward()
    new(xb).square().sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad)
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
    assert torch.allclose(out[out != 0], torch.full_like(out[out != 0], 1 / 0.9))
    torch.manual_seed(0)
    assert torch.equal(dropout(x, 0.1, True), out)
    assert dropout(x, 0.1, False) is x and dropout(x, 0.0, True) is x
    leaf = x.clone().requires_grad_()
    torch.manual_seed(0)
    dropout(leaf, 0.1, True).sum().backward()
    assert torch.equal(leaf.grad, out), "the gradient passes where the value passed, scaled alike"


def test_dropout_module_is_an_nn_dropout_with_the_lean_mask():
    layer = Dropout(0.25)
    assert isinstance(layer, nn.Dropout) and not layer.state_dict()
    x = torch.randn(4, 8)
    torch.manual_seed(3)
    drawn = layer(x)
    torch.manual_seed(3)
    assert torch.equal(drawn, dropout(x, 0.25, True))
    assert torch.equal(layer.eval()(x), x)
