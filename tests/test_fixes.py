"""Known answers for the shift-invariance remedies in ``transinv.fixes``: BlurPool, APS, padding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

import transinv
from transinv import fixes
from transinv import metrics as M
from transinv.errors import UserError
from transinv.examples import circular_gap, strided_circular
from transinv.fixes import FixError

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
APS_SHIFTS = [(dx, 0) for dx in range(1, 6)] + [(1, 1), (3, 3), (5, 5), (2, 3), (-3, 4)]


def _roll(x: torch.Tensor, shift: tuple[int, int]) -> torch.Tensor:
    """Content moved right by dx and down by dy, wrapping around (the library's convention)."""
    dx, dy = shift
    return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))


def _resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


@pytest.fixture(scope="module")
def image_files(imagenet_sample: Path) -> list[str]:
    return [str(p) for p in sorted(imagenet_sample.glob("*.JPEG"))[::125][:4]]


@pytest.fixture(scope="module")
def images64(image_files: list[str]) -> torch.Tensor:
    return _load64(image_files)


def _load64(files: list[str]) -> torch.Tensor:
    """Photographs as a normalised 64 px batch (shorter side resized, centre crop)."""
    batch = []
    for path in files:
        image = Image.open(path).convert("RGB")
        image.thumbnail((10_000, 64) if image.width > image.height else (64, 10_000))
        left, top = (image.width - 64) // 2, (image.height - 64) // 2
        image = image.crop((left, top, left + 64, top + 64))
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(64, 64, 3)
        batch.append((pixels.permute(2, 0, 1).float() / 255 - IMAGENET_MEAN) / IMAGENET_STD)
    return torch.stack(batch)


def _worst_output_change(model: nn.Module, x: torch.Tensor, shifts: list[tuple[int, int]]) -> dict[tuple[int, int], tuple[float, float]]:
    """Per shift: (lowest top-1 agreement, largest KL) between the logits of rolled and original inputs."""
    with torch.no_grad():
        reference = model(x)
        out = {}
        for shift in shifts:
            cmp = M.compare_outputs(reference, model(_roll(x, shift)))
            out[shift] = (cmp.agreement.min().item(), cmp.kl.max().item())
    return out


# ---- BlurPool ---------------------------------------------------------------------------------


def test_blurpool_leaves_a_stride1_network_unchanged() -> None:
    torch.manual_seed(0)
    model = circular_gap().eval()
    fixed = fixes.antialias(model)
    assert not any(isinstance(m, fixes.Blur) for m in fixed.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fixed(x), model(x))


@pytest.mark.parametrize("kernel", [2, 3, 5, 7])
@pytest.mark.parametrize("padding_mode", ["circular", "zeros"])
def test_blurpool_removes_the_checkerboard_aliasing_of_stride2_subsampling(kernel: int, padding_mode: str) -> None:
    """A stride-2 1x1 conv (weights W, bias b) on x = a + c * checkerboard, pooled globally.

    Without blur the conv keeps phase (0, 0): every pixel is a + c, and after a shift with dx + dy
    odd every pixel is a - c, so pooled_invariance_error = 2|c| ||W1|| / ||(a + c) W1 + b||
    exactly (0 when dx + dy is even: the checkerboard is unchanged). With BlurPool the conv runs
    at stride 1 and the binomial filter follows; its frequency response cos(w/2)^(K-1) is exactly
    0 at Nyquist (w = pi) for every K >= 2, and circular or reflection padding keep the
    checkerboard a checkerboard, so every blurred pixel is W a + b whatever the shift: the error
    falls from the value above to 0 (a factor without bound; float rounding only, <= 1e-6).
    """
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 1, stride=2, padding_mode=padding_mode)
    a, c = 0.5, 1.0
    ii, jj = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    x = (a + c * (1 - 2 * ((ii + jj) % 2)).float()).expand(2, 3, 32, 32)
    w1 = conv.weight.detach()[:, :, 0, 0].sum(dim=1)
    flipped = (2 * abs(c) * w1.norm() / ((a + c) * w1 + conv.bias.detach()).norm()).item()
    assert flipped > 0.5  # large: the output's global mean moves by most of its size

    blurred = fixes.antialias(conv, kernel)
    assert isinstance(blurred.down, fixes.Blur) and blurred.down.circular == (padding_mode == "circular")
    with torch.no_grad():
        ref, ref_blur = conv(x), blurred(x)
        assert ref_blur.shape == ref.shape
        for shift in [(1, 0), (0, 1), (3, 2), (5, 0), (1, 1), (2, 0), (3, 5)]:
            odd = sum(shift) % 2 == 1
            before = M.pooled_invariance_error(ref, conv(_roll(x, shift)))
            after = M.pooled_invariance_error(ref_blur, blurred(_roll(x, shift)))
            assert torch.allclose(before, torch.full_like(before, flipped if odd else 0.0), atol=1e-6)
            assert after.max().item() <= 1e-6


def test_blurpool_keeps_a_circular_network_exact_at_even_shifts(few_images: Path) -> None:
    torch.manual_seed(0)
    model = strided_circular().eval()
    fixed = fixes.antialias(model)
    assert isinstance(fixed[2], fixes.DownsampledConv2d) and fixed[2].down.circular
    settings = dict(weights="none", data=str(few_images), shift="0..4", mode="circular", layers="2,3", size=32, resize=40)
    rows = {}
    for name, net in (("base", model), ("blurpool", fixed)):
        result = transinv.measure(net, **settings).rows
        rows[name] = result[result["layer"] == "3"].set_index(["metric", "shift_x"])["value"]
    for shift in (2, 4):
        assert rows["blurpool"][(M.EQUIVARIANCE_ERROR, shift)] <= 1e-5
    for shift in (1, 3):  # odd shifts: the blur removes most of the aliasing (0.037 -> 0.0058 here)
        assert rows["blurpool"][(M.POOLED_INVARIANCE_ERROR, shift)] < 0.5 * rows["base"][(M.POOLED_INVARIANCE_ERROR, shift)]


# ---- set_padding --------------------------------------------------------------------------------


def _stride1_zero_padded_net() -> nn.Sequential:
    """Stride-1 convs and a padded max pool, global average pooling, a head with large logits."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=1, padding=1),
        nn.Conv2d(8, 8, 5, padding=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    ).eval()
    nn.init.normal_(net[-1].weight, std=1.0)
    return net


def _layer_errors_and_kl(model: nn.Sequential, x: torch.Tensor, shift: tuple[int, int]) -> tuple[dict[int, float], float]:
    """Circular equivariance error of layers 0..4 (stride 1, so the feature shift is the shift) and output KL."""
    maps: list[torch.Tensor] = []
    handles = [model[i].register_forward_hook(lambda _m, _i, out: maps.append(out.clone())) for i in range(5)]
    with torch.no_grad():
        reference = model(x)
        shifted = model(_roll(x, shift))
    for handle in handles:
        handle.remove()
    errors = {i: M.equivariance_error(maps[i], maps[i + 5], shift, circular=True).max().item() for i in range(5)}
    return errors, M.compare_outputs(reference, shifted).kl.max().item()


def test_set_padding_circular_makes_a_stride1_network_exactly_equivariant() -> None:
    model = _stride1_zero_padded_net()
    fixed = fixes.set_padding(model, "circular")
    assert all(m.padding_mode == "circular" for m in fixed.modules() if isinstance(m, nn.Conv2d))
    assert isinstance(fixed[2], fixes.ShiftPool2d) and fixed[2].pool.padding == 0
    torch.manual_seed(1)
    x = torch.randn(2, 3, 16, 16)
    for shift in [(1, 0), (0, 3), (2, 5), (-3, -1)]:
        errors, kl = _layer_errors_and_kl(model, x, shift)
        assert min(errors[i] for i in (0, 2, 3)) > 1e-2 and kl > 1e-5  # zero padding: not exact
        errors, kl = _layer_errors_and_kl(fixed, x, shift)
        assert max(errors.values()) <= 1e-5 and kl <= 1e-6


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate"])
def test_set_padding_other_modes(mode: str) -> None:
    model = _stride1_zero_padded_net()
    fixed = fixes.set_padding(model, mode)
    assert all(m.padding_mode == mode for m in fixed.modules() if isinstance(m, nn.Conv2d))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        if mode == "zeros":  # the original behaviour, pools included
            assert isinstance(fixed[2], nn.MaxPool2d) and torch.equal(fixed(x), model(x))
        else:
            assert fixed[2].pad_mode == mode and fixed(x).shape == model(x).shape
    undone = fixes.set_padding(fixes.set_padding(model, "circular"), "zeros")
    with torch.no_grad():
        assert isinstance(undone[2], nn.MaxPool2d) and torch.equal(undone(x), model(x))


# ---- APS ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["padding:circular+aps", "padding:circular+blurpool+aps"])
def test_aps_circular_resnet18_is_exactly_shift_invariant(images64: torch.Tensor, variant: str) -> None:
    fixed = fixes.apply_variant(_resnet18(), variant)
    changes = _worst_output_change(fixed, images64, APS_SHIFTS)
    assert all(agreement == 1.0 for agreement, _ in changes.values())
    assert max(kl for _, kl in changes.values()) <= 1e-5


def test_circular_resnet18_without_aps_is_not_invariant_at_odd_shifts(images64: torch.Tensor) -> None:
    circular = fixes.set_padding(_resnet18(), "circular")
    changes = _worst_output_change(circular, images64, [(1, 0), (3, 0), (5, 0), (2, 3)])
    assert min(kl for _, kl in changes.values()) > 1e-6


def test_aps_resnet18_is_invariant_when_measured(image_files: list[str]) -> None:
    fixed = fixes.adaptive_polyphase(fixes.set_padding(_resnet18(), "circular"))
    settings = dict(weights="none", data=image_files, mode="circular", layers="none", size=64, resize=64)
    for shift, direction in (("0..5", "x"), ("1,3,5", "diagonal"), ("2,7", "y")):
        rows = transinv.measure(fixed, shift=shift, direction=direction, **settings).rows
        assert (rows[rows["metric"] == M.TOP1_AGREEMENT]["value"] == 1.0).all()
        assert rows[rows["metric"] == M.KL_DIVERGENCE]["value"].max() <= 1e-5
        assert (rows["n"] == len(image_files)).all()


def test_aps_shares_one_choice_between_a_block_main_path_and_shortcut() -> None:
    fixed = fixes.adaptive_polyphase(_resnet18())
    for layer in (fixed.layer2, fixed.layer3, fixed.layer4):
        lead, follow = layer[0].conv1.down, layer[0].downsample[0].down
        assert (lead.role, follow.role) == ("lead", "follow") and lead.group is follow.group
    assert fixed.conv1.down.role is None and fixed.maxpool.down.role is None
    torch.manual_seed(0)
    bottleneck = fixes.adaptive_polyphase(torchvision.models.resnet50(weights=None)).layer2[0]
    assert bottleneck.conv2.down.role == "lead" and bottleneck.downsample[0].down.group is bottleneck.conv2.down.group


# ---- all transforms -----------------------------------------------------------------------------

TRANSFORMS = {
    "blurpool": fixes.antialias,
    "aps": fixes.adaptive_polyphase,
    "padding": lambda m: fixes.set_padding(m, "circular"),
    "all": lambda m: fixes.apply_variant(m, "padding:circular+blurpool:5+aps"),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_transforms_keep_weights_and_checkpoints_and_leave_the_model_alone(name: str) -> None:
    model = _resnet18()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    text = repr(model)
    fixed = TRANSFORMS[name](model)
    params, new_params = dict(model.named_parameters()), dict(fixed.named_parameters())
    assert params.keys() == new_params.keys()
    assert all(torch.equal(params[k], new_params[k]) and params[k] is not new_params[k] for k in params)
    assert list(fixed.state_dict()) == list(before)
    fixed.load_state_dict(before)  # strict: original checkpoints still load
    blurs = [m for m in fixed.modules() if isinstance(m, fixes.Blur)]
    assert all(not b.kernel.requires_grad and abs(b.kernel.sum().item() - 1) < 1e-6 for b in blurs)
    assert repr(model) == text and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.conv1.stride == (2, 2) and isinstance(model.maxpool, nn.MaxPool2d)


@pytest.mark.parametrize("training", [True, False])
def test_transforms_keep_the_train_or_eval_mode(training: bool) -> None:
    model = _resnet18().train(training)
    model.layer1.eval()  # mixed modes survive too
    for transform in TRANSFORMS.values():
        fixed = transform(model)
        assert fixed.training == training and fixed.conv1.training == training and not fixed.layer1.training
        assert all(m.training == training for m in fixed.layer2.modules())


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn", "mobilenet_v3_small"])
def test_torchvision_models_run_after_blurpool_and_aps(name: str) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for transform in (fixes.antialias, fixes.adaptive_polyphase):
            fixed = transform(model)
            assert any(isinstance(m, (fixes.DownsampledConv2d, fixes.ShiftPool2d)) for m in fixed.modules())
            out = fixed(x)
            assert out.shape == (2, 1000) and torch.isfinite(out).all()
    del model, fixed


def test_kernel_sizes_are_binomial() -> None:
    assert fixes.binomial_kernel(2)[0].tolist() == pytest.approx([0.25, 0.25])
    expected = torch.tensor([1.0, 4, 6, 4, 1])
    assert torch.allclose(fixes.binomial_kernel(5), torch.outer(expected, expected) / 256)


def test_outputs_keep_their_size_on_odd_maps() -> None:
    layers = [nn.MaxPool2d(2), nn.AvgPool2d(2), nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(3, 2, ceil_mode=True), nn.Conv2d(3, 3, 3, 2, 1)]
    x = torch.randn(2, 3, 15, 13)
    for layer in layers:
        for transform in (fixes.antialias, fixes.adaptive_polyphase):
            assert transform(layer)(x).shape == layer(x).shape, (layer, transform)


# ---- errors and the variant spec ----------------------------------------------------------------


@pytest.mark.parametrize(
    "layer, stride",
    [(nn.Conv2d(3, 3, 3, stride=3), "(3, 3)"), (nn.Conv2d(3, 3, 3, stride=(2, 1)), "(2, 1)"), (nn.MaxPool2d(4, 4), "(4, 4)")],
)
def test_untransformable_layers_raise_one_line_naming_the_layer(layer: nn.Module, stride: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Sequential(nn.ReLU(), layer))
    for transform in (fixes.antialias, fixes.adaptive_polyphase):
        with pytest.raises(FixError) as info:
            transform(model)
        message = str(info.value)
        assert "\n" not in message and "layer 1.1 " in message and stride in message
        assert isinstance(info.value, ValueError) and isinstance(info.value, UserError)


def test_other_strided_layers_and_bad_arguments_raise() -> None:
    with pytest.raises(FixError, match="layer 0 .*Conv1d"):
        fixes.antialias(nn.Sequential(nn.Conv1d(3, 3, 3, stride=2)))
    with pytest.raises(FixError, match="zeros, circular, reflect, replicate"):
        fixes.set_padding(nn.Conv2d(3, 3, 3), "wrap")
    with pytest.raises(FixError, match="from 2 to 7"):
        fixes.antialias(nn.Conv2d(3, 3, 3), kernel=8)
    with pytest.raises(FixError, match="apply padding before"):
        fixes.set_padding(fixes.antialias(nn.Conv2d(3, 3, 3, stride=2)), "circular")


@pytest.mark.parametrize(
    "variant, says",
    [
        ("aps+dropout", "use base, blurpool, blurpool:K (K = 2..7), aps, padding:MODE"),
        ("padding:wrap", "MODE = zeros, circular, reflect, replicate"),
        ("", "use base, blurpool"),
        ("base:1", "use base, blurpool"),
        ("blurpool:9", "from 2 to 7"),
        ("blurpool:x", "from 2 to 7"),
        ("aps+aps", "repeats 'aps'"),
    ],
)
def test_bad_variants_raise_one_line_saying_what_is_valid(variant: str, says: str) -> None:
    with pytest.raises(FixError) as info:
        fixes.apply_variant(nn.Identity(), variant)
    message = str(info.value)
    assert "\n" not in message and repr(variant) in message and says in message


def test_variants_parse_and_apply_in_a_fixed_order() -> None:
    assert fixes.parse_variant("base") == (None, None, False)
    assert fixes.parse_variant("blurpool") == (None, 3, False)
    assert fixes.parse_variant(" aps + padding:circular + blurpool:5 ") == ("circular", 5, True)
    model = _resnet18()
    base = fixes.apply_variant(model, "base")
    assert base is not model and repr(base) == repr(model)
    one, other = fixes.apply_variant(model, "aps+padding:circular"), fixes.apply_variant(model, "padding:circular+aps")
    assert repr(one) == repr(other) and isinstance(one.conv1.down, fixes.PolyphaseDown) and one.conv1.circular
    mixed = fixes.apply_variant(model, "aps+blurpool:4")  # blurpool before aps: APS after the blur
    assert mixed.conv1.down.lowpass.kernel.shape == (4, 4)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(one(x), other(x))
