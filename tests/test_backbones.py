"""Every registered backbone x every returnt mode: the returnt contract and flat parameters."""

import pytest
import torch

from tests.conftest import backbone_params, build_small
from zoo import RETURNT_MODES
from zoo.base import unpack_outputs


def _with_input(name: str):
    net, shape = build_small(name)
    torch.manual_seed(1)
    return net, torch.randn(2, *shape)


@pytest.fixture(scope="module", params=backbone_params())
def built(request):
    return _with_input(request.param)


def test_contract_all_modes(built):
    net, x = built
    with torch.no_grad():
        out = net(x)
        feats = net(x, returnt="features")
        both = net(x, returnt="both")
        full = net(x, returnt="full")
    num_classes = getattr(net, "registry_kwargs", {}).get("num_classes", 10)  # tiny ViT: built directly
    assert out.shape == (2, num_classes)
    assert feats.shape == (2, net.feature_dim)
    assert isinstance(both, tuple) and len(both) == 2
    assert torch.equal(both[0], out) and torch.equal(both[1], feats)
    assert isinstance(full, list) and len(full) == len(net.stages) + 2
    assert torch.equal(full[-1], out) and torch.equal(full[-2], feats)
    for tensor, stage in zip(full, net.stages):
        assert tensor.shape[0] == 2 and tensor.shape[stage.channel_dim] == stage.channels, stage
    assert net.output_names()[-2:] == ["features", "logits"]
    torch.testing.assert_close(net.features(x), feats)


@pytest.mark.parametrize("bad", ["all", "OUT", ""])
def test_unknown_returnt(built, bad):
    net, x = built
    with pytest.raises(ValueError, match="allowed: out, features, both, full"):
        net(x, returnt=bad)


@pytest.fixture(scope="module", params=backbone_params(fmt="torchscript"))
def scriptable(request):
    """`built`, for the backbones that script (timm's do not: no TorchScript file for them)."""
    return _with_input(request.param)


def test_backbone_scripts_with_returnt(scriptable):
    net, x = scriptable
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
        scripted = torch.jit.script(net)
    with torch.no_grad():
        for mode in RETURNT_MODES:
            got, want = scripted(x, mode), net(x, returnt=mode)
            for g, w in zip(unpack_outputs(got), unpack_outputs(want)):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_flat_params_roundtrip(built):
    net, x = built
    v = net.get_params()
    assert v.dim() == 1 and v.numel() == net.num_params()
    assert torch.equal(v, torch.nn.utils.parameters_to_vector(net.parameters()))
    new = torch.randn_like(v)
    before = net(x)
    net.set_params(new)
    try:
        assert torch.equal(net.get_params(), new)
        assert not torch.allclose(net(x), before)
    finally:
        net.set_params(v)


def test_flat_params_bad_vectors_change_nothing(built):
    net, _ = built
    v = net.get_params()
    n = v.numel()
    for bad, msg in [
        (torch.zeros(n + 1), f"expected {n} elements, got {n + 1}"),
        (torch.zeros(n, dtype=torch.float64), "expected dtype torch.float32"),
        (torch.zeros(1, n), "1-D"),
        ([0.0] * 3, "torch.Tensor"),
    ]:
        with pytest.raises(ValueError, match=msg):
            net.set_params(bad)
        with pytest.raises(ValueError, match=msg):
            net.set_grads(bad)
    assert torch.equal(net.get_params(), v)


def test_grads(built):
    net, x = built
    net.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="call loss.backward"):
        net.get_grads()
    net.train()
    try:
        (net(x) - 1).square().sum().backward()  # not net(x)**2: some heads start at zero
    finally:
        net.eval()
    g = net.get_grads()
    assert g.shape == (net.num_params(),) and g.abs().sum() > 0
    assert len(net.get_grads_list()) == len(list(net.parameters()))
    net.set_grads(g * 2)
    torch.testing.assert_close(net.get_grads(), g * 2)
    net.zero_grad(set_to_none=True)
    net.set_grads(g)  # creates .grad where there is none
    torch.testing.assert_close(net.get_grads(), g)
    net.zero_grad(set_to_none=True)


def test_forward_and_heads_follow_the_one_mode_table(built):
    """`mode_outputs` (the table ONNX names, manifests and OnnxBackbone use) is what forward and
    the export heads return."""
    from zoo.base import mode_outputs, pack_outputs
    from zoo.heads import make_head

    net, x = built
    names = net.output_names()
    with torch.no_grad():
        full = dict(zip(names, net(x, returnt="full")))
        for mode, outputs in mode_outputs(names).items():
            want = pack_outputs(mode, [full[n] for n in outputs])
            for got in (net(x, returnt=mode), make_head(net, mode)(x)):
                assert type(got) is type(want)
                assert all(torch.equal(g, w) for g, w in zip(unpack_outputs(got), unpack_outputs(want),
                                                             strict=True)), mode
