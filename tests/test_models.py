import math

import pytest
import torch
from torch import nn

from bpkit.errors import BpkitConfigError
from bpkit.models import MLP, RNN, ResNet


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "gelu", "tanh", "sigmoid"])
@pytest.mark.parametrize("norm", ["none", "batch", "layer"])
def test_mlp_shapes_forward_backward(activation, norm):
    net = MLP(64, 10, depth=4, width=32, activation=activation, norm=norm)
    x = torch.randn(8, 64, requires_grad=True)
    y = net(x)
    assert y.shape == (8, 10)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert all(p.grad is not None and p.grad.shape == p.shape for p in net.parameters())
    assert len([m for m in net.modules() if isinstance(m, nn.Linear)]) == 4


def test_mlp_he_init_variance():
    net = MLP(512, 10, depth=4, width=512, init="he")
    for block in net.blocks:
        w = block.linear.weight
        fan_in = w.shape[1]
        assert w.var().item() == pytest.approx(2.0 / fan_in, rel=0.1)
        assert torch.all(block.linear.bias == 0)


def test_mlp_xavier_and_orthogonal_init():
    net = MLP(256, 10, depth=3, width=256, init="xavier", activation="tanh")
    w = net.blocks[1].linear.weight
    gain = nn.init.calculate_gain("tanh")
    assert w.std().item() == pytest.approx(gain * math.sqrt(2.0 / (256 + 256)), rel=0.1)
    net = MLP(64, 10, depth=3, width=64, init="orthogonal", activation="tanh")
    w = net.blocks[1].linear.weight / nn.init.calculate_gain("tanh")
    assert torch.allclose(w @ w.T, torch.eye(64), atol=1e-4)


def test_mlp_residual_has_skip_and_plain_has_none():
    for residual in (True, False):
        net = MLP(16, 4, depth=4, width=16, residual=residual)
        block = net.blocks[1]
        with torch.no_grad():
            block.linear.weight.zero_()
            block.linear.bias.fill_(-5.0)  # relu(-5) = 0: the block's own path outputs zeros
        x = torch.randn(3, 16)
        out = block(x)
        if residual:
            assert torch.equal(out, x)
        else:
            assert torch.equal(out, torch.zeros_like(x))
    assert not MLP(16, 4, depth=3, width=8, residual=True).blocks[0].residual  # 16 -> 8: no skip possible


def test_mlp_checkpointing_same_gradients():
    torch.manual_seed(0)
    a = MLP(16, 4, depth=5, width=16)
    b = MLP(16, 4, depth=5, width=16, checkpointing=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(6, 16)
    a(x).square().sum().backward()
    b(x).square().sum().backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6)


@pytest.mark.parametrize("cell", ["rnn_tanh", "rnn_relu", "lstm", "gru"])
def test_rnn_shapes_and_hidden_carry(cell):
    net = RNN(cell, input_size=3, hidden_size=8, num_layers=2, out_features=5, output="all")
    x = torch.randn(4, 10, 3)
    y, h = net(x)
    assert y.shape == (4, 10, 5)
    # carrying the hidden state across two chunks equals one pass over the whole sequence
    y1, h1 = net(x[:, :6])
    y2, _ = net(x[:, 6:], h1)
    assert torch.allclose(torch.cat([y1, y2], 1), y, atol=1e-5)
    y.sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    last, _ = RNN(cell, input_size=3, hidden_size=8, out_features=5)(x)
    assert last.shape == (4, 5)


@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "gru"])
def test_rnn_recurrent_scale_is_scaled_orthogonal(cell):
    net = RNN(cell, input_size=2, hidden_size=16, recurrent_scale=1.5)
    for chunk in net.rnn.weight_hh_l0.detach().split(16):
        assert torch.allclose(chunk @ chunk.T, 2.25 * torch.eye(16), atol=1e-4)


def test_rnn_token_inputs():
    net = RNN("gru", input_size=8, hidden_size=16, out_features=30, vocab_size=30, output="all")
    y, _ = net(torch.randint(0, 30, (2, 7)))
    assert y.shape == (2, 7, 30)


@pytest.mark.parametrize("norm", ["batch", "none"])
@pytest.mark.parametrize("residual", [True, False])
def test_resnet_shapes(norm, residual):
    net = ResNet(1, 10, depth=5, width=8, stages=2, norm=norm, residual=residual)
    x = torch.randn(4, 1, 8, 8, requires_grad=True)
    y = net(x)
    assert y.shape == (4, 10)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert len(net.blocks) == 5


def test_resnet_plain_has_no_skip_path():
    for residual in (True, False):
        net = ResNet(1, 10, depth=2, width=4, stages=1, norm="none", residual=residual)
        block = net.blocks[1]
        with torch.no_grad():
            for conv in (block.conv1, block.conv2):
                conv.weight.zero_()
                conv.bias.zero_()
        x = torch.rand(2, 4, 8, 8)
        out = block(x)
        assert torch.equal(out, x if residual else torch.zeros_like(x))
    plain = ResNet(1, 10, depth=4, width=4, stages=2, residual=False)
    assert all(b.shortcut is None and not b.residual for b in plain.blocks)


def test_resnet_he_init_and_checkpointing():
    net = ResNet(1, 10, depth=2, width=32, stages=1, init="he")
    w = net.blocks[0].conv2.weight
    assert w.var().item() == pytest.approx(2.0 / (32 * 9), rel=0.1)
    torch.manual_seed(0)
    a = ResNet(1, 10, depth=3, width=4, norm="none")
    b = ResNet(1, 10, depth=3, width=4, norm="none", checkpointing=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 1, 8, 8)
    a(x).sum().backward()
    b(x).sum().backward()
    assert all(torch.allclose(pa.grad, pb.grad, atol=1e-6) for pa, pb in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("make, match", [
    (lambda: MLP(64, 10, depth=0), "depth=0"),
    (lambda: MLP(64, 10, width=-3), "width=-3"),
    (lambda: MLP(64, 10, activation="swish"), "activation='swish'.*relu, leaky_relu"),
    (lambda: MLP(64, 10, norm="group"), "norm='group'"),
    (lambda: MLP(64, 10, init="lecun"), "init='lecun'.*he"),
    (lambda: RNN("transformer"), "cell='transformer'.*lstm"),
    (lambda: RNN("lstm", hidden_size=0), "hidden_size=0"),
    (lambda: RNN("lstm", recurrent_scale=-1.0), "recurrent_scale=-1.0"),
    (lambda: ResNet(depth=0), "depth=0"),
    (lambda: ResNet(norm="layer"), "norm='layer'"),
])
def test_bad_arguments(make, match):
    with pytest.raises(BpkitConfigError, match=match):
        make()
