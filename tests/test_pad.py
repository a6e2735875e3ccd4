"""``pad_channels``: widths rounded up to a multiple, the same function, the padding zero for
good (``rwdet.nn.pad``)."""

import pytest
import torch
from torch import nn

from rwdet.models import build_model
from rwdet.nn import GraphStage, pad_channels

KW = {
    "channels": 9,
    "nodes": 10,
    "num_classes": 5,
    "stem": "small",
    "head_channels": 20,
    "dropout": 0.0,
}


def _pair(**kw):
    torch.manual_seed(0)
    model = build_model("randwire_c109", **{**KW, **kw})
    with torch.no_grad():  # BN away from its (1, 0, 0, 1) init, so a wrong pad would show
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_()
                m.running_mean.normal_(), m.running_var.uniform_(0.5, 2.0)
    return model, pad_channels(model, 8)


def _real(p_pad: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return p_pad[tuple(slice(0, s) for s in p.shape)]


def _pad_part(p_pad: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(p_pad, dtype=torch.bool)
    mask[tuple(slice(0, s) for s in p.shape)] = False
    return p_pad[mask]


def test_widths_become_multiples_and_the_original_is_untouched():
    model, padded = _pair()
    widths = sorted({m.out_channels for m in model.modules() if type(m) is nn.Conv2d})
    assert any(w % 8 for w in widths)  # 9, 18, 36, 72 and the stem's 4: a real test
    for m in padded.modules():
        if type(m) is nn.Conv2d:
            assert m.out_channels % 8 == 0 and m.weight.shape[0] == m.out_channels
            assert m.in_channels == 3 or m.in_channels % 8 == 0  # the image stays 3 channels
        if isinstance(m, GraphStage):
            assert m.in_channels % 8 == 0 and m.out_channels % 8 == 0
    assert all(c % 8 == 0 for c in padded.stage_channels.values())
    assert padded.stage_channels["conv3"] == 24 and model.stage_channels["conv3"] == 18
    assert sorted({m.out_channels for m in model.modules() if type(m) is nn.Conv2d}) == widths


@pytest.mark.parametrize("execution", ["auto", "reference"])
def test_same_outputs_and_gradients_and_the_padding_stays_zero_while_training(execution):
    model, padded = _pair()
    for m in (model, padded):
        for s in m.modules():
            if isinstance(s, GraphStage):
                s.execution = execution
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    opts = [
        torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
        for m in (model, padded)
    ]
    seen = {}
    padded.conv4.register_forward_hook(lambda m, i, o: seen.update(out=o))
    for _ in range(3):
        losses = []
        for m, opt in zip((model, padded), opts):
            m.train()
            loss = nn.functional.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            losses.append(loss)
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        named = dict(padded.named_parameters())
        for name, p in model.named_parameters():
            q = named[name]
            torch.testing.assert_close(_real(q.grad, p), p.grad, rtol=1e-4, atol=1e-6, msg=name)
            assert not _pad_part(q.grad, p).any(), name  # exactly zero, not just small
        for opt in opts:
            opt.step()
        for name, p in model.named_parameters():
            assert not _pad_part(named[name], p).any(), name
        real = model.stage_channels["conv4"]
        assert not seen["out"][:, real:].any() and seen["out"][:, :real].abs().sum() > 0
    model.eval(), padded.eval()
    with torch.no_grad():  # running statistics too
        torch.testing.assert_close(padded(x), model(x), rtol=1e-4, atol=1e-5)


def test_what_cannot_be_padded_exactly_is_refused():
    with pytest.raises(ValueError, match=r"is a PopupConv2d, which it cannot pad exactly"):
        pad_channels(build_model("randwire_small", wiring="popup", **KW))
    from detectron2.layers import FrozenBatchNorm2d  # its state is all buffers

    frozen = build_model("randwire_small", **KW)
    frozen.conv3.nodes[0][3] = FrozenBatchNorm2d(frozen.conv3.nodes[0][3].num_features)
    with pytest.raises(ValueError, match=r"conv3.nodes.0.3 is a FrozenBatchNorm2d"):
        pad_channels(frozen)
    with pytest.raises(ValueError, match=r"multiple=0; pass a positive integer"):
        pad_channels(build_model("randwire_small", **KW), 0)
