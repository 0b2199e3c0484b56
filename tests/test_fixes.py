"""Known answers for the shift-invariance remedies in ``transinv.fixes``: BlurPool, APS, padding.

BlurPool is checked against Zhang's released architectures, written here as plain forward
functions from the paper and the released code's structure (``antialiased-cnns`` itself is never
used): they run the torchvision model's own weights through Zhang's layer order, and the
transformed torchvision model must compute the same function at every input size.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.regnet import BlockParams, RegNet
from torchvision.models.resnet import BasicBlock, Bottleneck

import transinv
from transinv import fixes
from transinv.engine import metrics as M
from transinv.errors import UserError
from transinv.examples import circular_gap, strided_circular
from transinv.fixes import FixError

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
APS_SHIFTS = [(1, 0), (0, 3), (5, 5), (-3, 4), (17, -9)]
PASCAL = {2: (1, 1), 3: (1, 2, 1), 4: (1, 3, 3, 1), 5: (1, 4, 6, 4, 1)}


def _roll(x: torch.Tensor, shift: tuple[int, int]) -> torch.Tensor:
    """Content moved right by dx and down by dy, wrapping around (the library's convention)."""
    dx, dy = shift
    return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))


def _randomize_norms(model: nn.Module) -> nn.Module:
    """Seeded random batch-norm statistics and affine terms, so no batch norm is the identity."""
    generator = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(0.2 * torch.randn(c, generator=generator))
            m.running_var.copy_(0.5 + torch.rand(c, generator=generator))
            m.weight.data.copy_(0.5 + torch.rand(c, generator=generator))
            m.bias.data.copy_(0.2 * torch.randn(c, generator=generator))
    return model.eval()


def _resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


@pytest.fixture(scope="module")
def image_files(imagenet_sample: Path) -> list[str]:
    return [str(p) for p in sorted(imagenet_sample.glob("*.JPEG"))[::2][:4]]


@pytest.fixture(scope="module")
def images64(image_files: list[str]) -> torch.Tensor:
    batch = []
    for path in image_files:
        image = Image.open(path).convert("RGB")
        image.thumbnail((10_000, 64) if image.width > image.height else (64, 10_000))
        left, top = (image.width - 64) // 2, (image.height - 64) // 2
        image = image.crop((left, top, left + 64, top + 64))
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(64, 64, 3)
        batch.append((pixels.permute(2, 0, 1).float() / 255 - IMAGENET_MEAN) / IMAGENET_STD)
    return torch.stack(batch)


def _worst_output_change(model: nn.Module, x: torch.Tensor, shifts: list[tuple[int, int]]) -> tuple[float, float]:
    """(lowest top-1 agreement, largest KL) between the logits of rolled and original inputs."""
    agreement, kl = 1.0, 0.0
    with torch.no_grad():
        reference = model(x)
        for shift in shifts:
            cmp = M.compare_outputs(reference, model(_roll(x, shift)))
            agreement, kl = min(agreement, cmp.agreement.min().item()), max(kl, cmp.kl.max().item())
    return agreement, kl


# ---- Zhang's released architectures, from the paper and the released code's structure -----------


def zhang_blurpool(x: torch.Tensor, k: int = 4) -> torch.Tensor:
    """Zhang's BlurPool: reflection padding floor((k-1)/2) before and ceil((k-1)/2) after each axis,
    the normalised outer product of Pascal's row k, depthwise, stride 2."""
    row = torch.tensor(PASCAL[k], dtype=x.dtype)
    filt = torch.outer(row, row) / row.sum() ** 2
    before, after = (k - 1) // 2, math.ceil((k - 1) / 2)
    x = F.pad(x, (before, after, before, after), mode="reflect")
    return F.conv2d(x, filt.expand(x.shape[1], 1, k, k), stride=2, groups=x.shape[1])


def _conv(layer: nn.Conv2d, x: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """A torchvision conv's weights at another stride."""
    return F.conv2d(x, layer.weight, layer.bias, stride, layer.padding, layer.dilation, layer.groups)


def zhang_resnet(tv: nn.Module, x: torch.Tensor, k: int = 4, pool_only: bool = True) -> torch.Tensor:
    """Zhang's ResNet: the stem conv keeps stride 2 (pool_only) or runs at stride 1 and is blurred
    after its ReLU; the max-pool becomes an unpadded 2x2 max at stride 1, then the blur."""
    x = tv.relu(tv.bn1(_conv(tv.conv1, x, 2 if pool_only else 1)))
    if not pool_only:
        x = zhang_blurpool(x, k)
    x = zhang_blurpool(F.max_pool2d(x, 2, 1), k)
    for stage in (tv.layer1, tv.layer2, tv.layer3, tv.layer4):
        for block in stage:
            x = _zhang_block(block, x, k)
    return tv.fc(torch.flatten(tv.avgpool(x), 1))


def _zhang_block(block: nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
    """Zhang's blocks: every conv at stride 1; the blur after the ReLU of the conv that strode
    (conv1 in BasicBlock, conv2 in Bottleneck) and before the 1x1 shortcut conv."""
    strided = (block.conv1 if isinstance(block, BasicBlock) else block.conv2).stride != (1, 1)
    identity = x
    if block.downsample is not None:
        conv, bn = block.downsample
        identity = bn(_conv(conv, zhang_blurpool(x, k) if strided else x))
    out = block.relu(block.bn1(_conv(block.conv1, x)))
    if isinstance(block, Bottleneck):
        out = block.relu(block.bn2(_conv(block.conv2, out)))
    if strided:
        out = zhang_blurpool(out, k)
    if isinstance(block, BasicBlock):
        out = block.bn2(_conv(block.conv2, out))
    else:
        out = block.bn3(_conv(block.conv3, out))
    return block.relu(out + identity)


def zhang_vgg(tv: nn.Module, x: torch.Tensor, k: int = 4) -> torch.Tensor:
    """Zhang's VGG: every 2x2 max-pool of stride 2 becomes a 2x2 max at stride 1, then the blur."""
    for layer in tv.features:
        x = zhang_blurpool(F.max_pool2d(x, 2, 1), k) if isinstance(layer, nn.MaxPool2d) else layer(x)
    return tv.classifier(torch.flatten(tv.avgpool(x), 1))


def zhang_densenet(tv: nn.Module, x: torch.Tensor, k: int = 4) -> torch.Tensor:
    """Zhang's DenseNet: the stem conv keeps stride 2; the 3x3 max-pool runs at stride 1, then the
    blur; each transition's average pool is replaced by the blur."""
    f = tv.features
    x = f.relu0(f.norm0(_conv(f.conv0, x, 2)))
    x = zhang_blurpool(F.max_pool2d(x, 3, 1, 1), k)
    for name, layer in f.named_children():
        if name.startswith("transition"):
            x = zhang_blurpool(layer.conv(layer.relu(layer.norm(x))), k)
        elif name.startswith(("denseblock", "norm5")):
            x = layer(x)
    return tv.classifier(torch.flatten(F.adaptive_avg_pool2d(F.relu(x), 1), 1))


def zhang_mobilenet_v2(tv: nn.Module, x: torch.Tensor, k: int = 4) -> torch.Tensor:
    """Zhang's MobileNetV2: the stem keeps stride 2; a strided block's depthwise conv runs at
    stride 1 and is blurred after its ReLU6, before the pointwise projection."""
    for block in tv.features:
        if isinstance(block, InvertedResidual) and block.stride == 2:
            *expand, depthwise, project, bn = block.conv
            for layer in expand:
                x = layer(x)
            conv, norm, act = depthwise
            x = bn(_conv(project, zhang_blurpool(act(norm(_conv(conv, x))), k)))
        else:
            x = block(x)
    return tv.classifier(x.mean([2, 3]))


def zhang_alexnet(tv: nn.Module, x: torch.Tensor, k: int = 4) -> torch.Tensor:
    """Zhang's AlexNet (its release blurs the stem too): conv1 at stride 2, ReLU, blur; each 3x3
    max-pool of stride 2 runs at stride 1, then the blur."""
    f = tv.features
    x = zhang_blurpool(F.relu(_conv(f[0], x, 2)), k)
    for layer in list(f)[2:]:
        x = zhang_blurpool(F.max_pool2d(x, 3, 1), k) if isinstance(layer, nn.MaxPool2d) else layer(x)
    return tv.classifier(torch.flatten(tv.avgpool(x), 1))


def _small(build, classifier_in: int) -> nn.Module:
    """A torchvision model built without its large fully connected head (a 10-way linear instead)."""
    with torch.device("meta"):
        model = build()
    model.classifier = nn.Linear(classifier_in, 10)
    model.features.to_empty(device="cpu")
    torch.manual_seed(0)
    for m in model.features.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return model


def _vgg(batch_norm: bool) -> nn.Module:
    cfg = [8, "M", 16, "M", 16, 16, "M", 512, "M"]
    return _small(lambda: torchvision.models.VGG(torchvision.models.vgg.make_layers(cfg, batch_norm)), 512 * 7 * 7)


ZHANG_FAMILIES = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), zhang_resnet, (64, 57)),
    "resnext-like bottleneck": (
        lambda: torchvision.models.ResNet(Bottleneck, [1, 1, 1, 1], groups=2, width_per_group=16, num_classes=10),
        zhang_resnet, (64, 57),
    ),
    "vgg": (lambda: _vgg(False), zhang_vgg, (64, 57)),
    "vgg_bn": (lambda: _vgg(True), zhang_vgg, (64, 57)),
    "densenet": (
        lambda: torchvision.models.DenseNet(8, (2, 2, 2, 2), 16, bn_size=2, num_classes=10), zhang_densenet, (64, 57),
    ),
    "mobilenet_v2": (lambda: torchvision.models.MobileNetV2(num_classes=10, width_mult=0.25), zhang_mobilenet_v2, (64, 57)),
    "alexnet": (lambda: _small(torchvision.models.AlexNet, 256 * 6 * 6), zhang_alexnet, (96, 99)),
}


@pytest.mark.parametrize("family", list(ZHANG_FAMILIES))
def test_blurpool_computes_zhangs_released_architecture(family: str) -> None:
    """The default ``blurpool`` (K = 4) on a torchvision model equals Zhang's architecture of that
    family holding the same weights, at even and odd input sizes."""
    build, reference, sizes = ZHANG_FAMILIES[family]
    torch.manual_seed(0)
    model = _randomize_norms(build())
    fixed = fixes.apply_variant(model, "blurpool")
    for size in sizes:
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            ours, zhang = fixed(x), reference(model, x)
        assert ours.shape == zhang.shape
        assert torch.allclose(ours, zhang, rtol=1e-4, atol=1e-5), (family, size, (ours - zhang).abs().max())


@pytest.mark.parametrize("kernel", [2, 5])
def test_blurpool_all_and_other_kernels_match_zhangs_options(kernel: int) -> None:
    """``blurpool-all:K`` is Zhang's ``pool_only=False, filter_size=K``; ``blurpool:K`` his ``filter_size=K``."""
    torch.manual_seed(0)
    model = _randomize_norms(torchvision.models.ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10))
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        for variant, pool_only in ((f"blurpool-all:{kernel}", False), (f"blurpool:{kernel}", True)):
            ours = fixes.apply_variant(model, variant)(x)
            assert torch.allclose(ours, zhang_resnet(model, x, kernel, pool_only), rtol=1e-4, atol=1e-5), variant


def test_blurpool_follows_the_paper_rule_in_other_architectures() -> None:
    """Outside Zhang's families: a strided conv runs at stride 1 and is blurred after the
    activation its norm leads to, whether a module (SiLU) or a function call in a block's forward
    (F.relu); an unactivated conv is blurred right after; the stem is kept."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(8, 8, 3, 2, 1), nn.BatchNorm2d(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(self.bn(self.conv(x)))

    torch.manual_seed(0)
    model = _randomize_norms(nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.SiLU(),
        nn.Conv2d(8, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.SiLU(),
        Block(), nn.Conv2d(8, 8, 3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ))
    fixed = fixes.apply_variant(model, "blurpool:3")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = model[2](model[1](model[0](x)))  # the stem, kept
        y = zhang_blurpool(model[5](model[4](_conv(model[3], y))), 3)
        y = zhang_blurpool(F.relu(model[6].bn(_conv(model[6].conv, y))), 3)
        y = zhang_blurpool(_conv(model[7], y), 3)
        assert torch.allclose(fixed(x), y.mean((2, 3)), rtol=1e-4, atol=1e-6)
    assert isinstance(fixed, nn.Sequential)  # still one, its children's names kept and the blur inserted
    assert list(fixed._modules) == ["0", "1", "2", "3", "4", "5", "5_blurpool", "6", "7", "8", "9"]
    assert type(fixed.get_submodule("6")).__name__ == "Block" and isinstance(fixed.get_submodule("6.relu_blurpool"), fixes.Blur)


def test_blurpool_removes_the_checkerboard_aliasing_of_stride2_subsampling() -> None:
    """A stride-2 1x1 conv (weights W, bias b) on x = a + c * checkerboard, pooled globally.

    Without blur the conv keeps phase (0, 0): every pixel is a + c, and after a shift with dx + dy
    odd every pixel is a - c, so pooled_invariance_error = 2|c| ||W1|| / ||(a + c) W1 + b||
    exactly (0 when dx + dy is even). BlurPool blurs the conv's input (a 1x1 conv, as Zhang's
    shortcut); the binomial response cos(w/2)^(K-1) is exactly 0 at Nyquist for every K >= 2, and
    circular or reflection padding keep the checkerboard a checkerboard, so every blurred pixel is
    W a + b whatever the shift: the error falls from the value above to 0 (float rounding only).
    """
    for kernel in (2, 3, 4, 7):
        for padding_mode in ("circular", "zeros"):
            torch.manual_seed(0)
            conv = nn.Conv2d(3, 8, 1, stride=2, padding_mode=padding_mode)
            a, c = 0.5, 1.0
            ii, jj = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
            x = (a + c * (1 - 2 * ((ii + jj) % 2)).float()).expand(2, 3, 32, 32)
            w1 = conv.weight.detach()[:, :, 0, 0].sum(dim=1)
            flipped = (2 * abs(c) * w1.norm() / ((a + c) * w1 + conv.bias.detach()).norm()).item()
            assert flipped > 0.5
            blurred = fixes.antialias(conv, kernel, stem=True)
            assert isinstance(blurred.pre, fixes.Blur) and blurred.pre.circular == (padding_mode == "circular")
            with torch.no_grad():
                ref, ref_blur = conv(x), blurred(x)
                assert ref_blur.shape == ref.shape
                for shift in [(1, 0), (0, 1), (3, 2), (1, 1), (2, 0)]:
                    odd = sum(shift) % 2 == 1
                    before = M.pooled_invariance_error(ref, conv(_roll(x, shift)))
                    after = M.pooled_invariance_error(ref_blur, blurred(_roll(x, shift)))
                    assert torch.allclose(before, torch.full_like(before, flipped if odd else 0.0), atol=1e-6)
                    assert after.max().item() <= 1e-6


def test_blurpool_leaves_a_stride1_network_unchanged() -> None:
    torch.manual_seed(0)
    model = circular_gap().eval()
    fixed, reports = fixes.build_variant(model, "blurpool")
    assert not any(isinstance(m, fixes.Blur) for m in fixed.modules()) and reports[0].replaced == []
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fixed(x), model(x))


def test_blurpool_keeps_a_circular_network_exact_at_even_shifts(few_images: Path) -> None:
    torch.manual_seed(0)
    model = strided_circular().eval()
    fixed = fixes.antialias(model, stem=True)
    assert isinstance(fixed[2], fixes.RestridedConv2d) and isinstance(fixed[3], torch.fx.GraphModule) is False
    settings = dict(weights="none", data=str(few_images), shift="0..4", mode="circular", layers="3", size=32, resize=40)
    rows = {}
    for name, net in (("base", model), ("blurpool", fixed)):
        result = transinv.measure(net, **settings).rows
        rows[name] = result[result["layer"] == "3"].set_index(["metric", "shift_x"])["value"]
    for shift in (2, 4):
        assert rows["blurpool"][(M.EQUIVARIANCE_ERROR, shift)] <= 1e-5
    for shift in (1, 3):  # odd shifts: the blur removes most of the aliasing
        assert rows["blurpool"][(M.POOLED_INVARIANCE_ERROR, shift)] < 0.5 * rows["base"][(M.POOLED_INVARIANCE_ERROR, shift)]


# ---- reports, chosen layers, batch norm, collapse --------------------------------------------------


def test_each_fix_reports_the_layers_it_replaced_and_kept() -> None:
    lines: list[str] = []
    fixes.apply_variant(_resnet18(), "padding:circular+blurpool", warn=lines.append, name="resnet18")
    assert lines[0] == (
        "padding:circular on resnet18: re-padded 21 layers (conv1, maxpool, layer1.0.conv1, layer1.0.conv2, "
        "layer1.1.conv1, layer1.1.conv2, layer2.0.conv1, layer2.0.conv2, layer2.0.downsample.0, layer2.1.conv1, "
        "layer2.1.conv2, layer3.0.conv1 and 9 more)"
    )
    assert lines[1:] == [
        "blurpool:4 on resnet18: replaced 7 strided layers (maxpool, layer2.0.conv1, layer2.0.downsample.0, "
        "layer3.0.conv1, layer3.0.downsample.0, layer4.0.conv1, layer4.0.downsample.0); kept layer conv1 "
        "(Conv2d): the stem, as Zhang's pool_only (blurpool-all blurs it)"
    ]
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Sequential(nn.ReLU(), nn.Conv2d(3, 3, 3, stride=3)),
                          nn.MaxPool2d(2))
    _, reports = fixes.build_variant(model, "blurpool-all")
    assert reports[0].replaced == ["2"] and reports[0].kept == [
        ("layer 1.1 (Conv2d)", "cannot: stride (3, 3); only (2, 2) or (4, 4) can be rebuilt")
    ]


def test_fixes_can_be_restricted_to_chosen_layers() -> None:
    model = _resnet18()
    fixed, reports = fixes.build_variant(model, "blurpool", layers=["layer4.*"])
    assert reports[0].replaced == ["layer4.0.conv1", "layer4.0.downsample.0"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fixed.layer3(model.layer2(x[:, :1].expand(2, 64, 64, 64))),
                           model.layer3(model.layer2(x[:, :1].expand(2, 64, 64, 64))))
    aps, reports = fixes.build_variant(model, "aps", layers=["layer4.*"], size=64)
    assert reports[0].replaced == ["layer4.0.conv1", "layer4.0.downsample.0"]
    with pytest.raises(FixError, match="layer4.0.conv1 and layer4.0.downsample.0 must share"):
        fixes.build_variant(model, "aps", layers=["layer4.0.conv1"], size=64)


def test_recalibrate_batchnorm_re_estimates_the_statistics_on_the_given_views() -> None:
    """With momentum None the running mean is the average of the batch means and the running
    variance the average of the unbiased batch variances, of what each batch norm receives."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5)).eval()
    model[1].momentum = 0.3
    views = [torch.randn(5, 3, 9, 9) for _ in range(3)]
    with torch.no_grad():
        inputs = [model[0](v) for v in views]
    assert fixes.recalibrate_batchnorm(model, views) == 1
    means = torch.stack([i.mean((0, 2, 3)) for i in inputs])
    variances = torch.stack([i.transpose(0, 1).flatten(1).var(dim=1) for i in inputs])
    assert torch.allclose(model[1].running_mean, means.mean(0), atol=1e-6)
    assert torch.allclose(model[1].running_var, variances.mean(0), atol=1e-5)
    assert not model.training and not model[3].training and model[1].momentum == 0.3


def test_a_variant_that_collapses_is_named_on_stderr(tmp_path: Path) -> None:
    """Checkerboard photographs and a stride-2 1x1 conv that sees only their white pixels: the
    base model says class 0 (logit 3 against 1); BlurPool (stem included: it is the only layer)
    blurs the checkerboard to grey (logit 0)
    and says class 1 on every image: agreement with the base 0, so a warning names the variant."""
    ii, jj = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    board = ((ii + jj) % 2 == 0).to(torch.uint8).mul(255)[..., None].expand(32, 32, 3).contiguous()
    for i in range(3):
        Image.fromarray(board.numpy()).save(tmp_path / f"board{i}.png")
    conv = nn.Conv2d(3, 2, 1, stride=2)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])[:, :, None, None])
        conv.bias.copy_(torch.tensor([0.0, 1.0]))
    model = nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    warnings: list[str] = []
    rows = transinv.measure(model, weights="none", data=str(tmp_path), variants="base,blurpool-all", shift="0", size=32,
                            resize=32, mean=(0.5,) * 3, std=(0.5,) * 3, layers="none", warn=warnings.append).rows
    assert (rows[rows["metric"] == M.TOP1_AGREEMENT]["value"] == 1).all()  # shift 0: each with itself
    collapse = [w for w in warnings if w.startswith("variant blurpool-all of Sequential agrees")]
    assert len(collapse) == 1 and "on 0.0% of the unshifted images" in collapse[0] and "fine-tune" in collapse[0]
    assert fixes.collapse_message("aps", 0.9, 0.70, 0.75) is None
    assert "accuracy 85.9% -> 7.8%" in fixes.collapse_message("blurpool", 0.6, 0.078, 0.859)


def test_measure_recalibrates_batchnorm_when_asked(few_images: Path) -> None:
    settings = dict(weights="none", data=str(few_images), shift="0,1", mode="circular", size=32, resize=32, layers="none")
    torch.manual_seed(0)
    model = torchvision.models.ResNet(BasicBlock, [1, 1, 1, 1]).eval()
    plain = transinv.measure(model, variants="blurpool", **settings).rows
    lines: list[str] = []
    recal = transinv.measure(model, variants="blurpool", recalibrate_bn=True, warn=lines.append, **settings).rows
    kl = lambda rows: rows[(rows["metric"] == M.KL_DIVERGENCE) & (rows["shift_x"] == 1)]["value"].item()  # noqa: E731
    assert kl(plain) != kl(recal)
    assert any("blurpool:4 on ResNet: replaced 7 strided layers" in line for line in lines)
    assert any("re-estimated 12 batch norms of ResNet [blurpool] on 6 images" in line for line in lines)


# ---- set_padding ----------------------------------------------------------------------------------


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


# ---- APS ------------------------------------------------------------------------------------------


def _tiny_bottleneck_resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.ResNet(Bottleneck, [1, 1, 1, 1], width_per_group=16, num_classes=10).eval()


APS_MODELS = {
    "resnet18": _resnet18,
    "bottleneck resnet (ResNet-50 blocks)": _tiny_bottleneck_resnet,
    "regnet (proj shortcuts, squeeze-excitation)": lambda: RegNet(
        BlockParams.from_init_params(depth=6, w_0=16, w_a=8.0, w_m=2.0, group_width=8, se_ratio=0.25),
        stem_width=8, num_classes=10,
    ),
    "shufflenet_v2": lambda: torchvision.models.ShuffleNetV2([1, 2, 1], [8, 16, 32, 64, 128], num_classes=10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.25),
    "densenet": lambda: torchvision.models.DenseNet(8, (2, 2, 2, 2), 16, bn_size=2, num_classes=10),
}


@pytest.mark.parametrize("name", list(APS_MODELS))
def test_aps_with_circular_padding_is_exact_on_torchvision_models(images64: torch.Tensor, name: str) -> None:
    """Circular padding + APS: top-1 agreement 1 and KL <= 1e-6 at every circular shift tried,
    residual shortcuts (RegNet's ``proj``, ResNet-50's stride after a 1x1) and ShuffleNet's two
    strided branches included; without APS resnet18 is not invariant."""
    torch.manual_seed(0)
    model = _randomize_norms(APS_MODELS[name]())
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    head.weight.data.mul_(30)  # confident logits: a small change of the pooled features shows in the KL
    images = images64[:2]
    fixed = fixes.apply_variant(model, "padding:circular+aps", size=64)
    agreement, kl = _worst_output_change(fixed, images, APS_SHIFTS)
    assert agreement == 1.0 and kl <= 1e-6
    if name == "resnet18":
        _, kl = _worst_output_change(fixes.set_padding(model, "circular"), images, [(1, 0), (3, 1)])
        assert kl > 1e-4


def test_aps_is_exact_at_every_circular_shift() -> None:
    """Every one of the 32 x 32 circular shifts of a 32-px image (the whole group: the network's
    stride is 32), through a ResNet with circular padding and APS: one output, to float rounding."""
    torch.manual_seed(0)
    model = _randomize_norms(torchvision.models.ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10))
    model.fc.weight.data.mul_(30)  # confident logits: a small change of the pooled features shows in the KL
    fixed = fixes.apply_variant(model, "padding:circular+aps", size=32)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = fixed(x)
        for dy in range(0, 32, 8):
            views = torch.cat([_roll(x, (dx, dy + k)) for k in range(8) for dx in range(32)])
            cmp = M.compare_outputs(reference.expand(len(views), -1), fixed(views))
            assert cmp.agreement.min().item() == 1.0 and cmp.kl.max().item() <= 1e-6, dy


def test_aps_shares_one_choice_between_the_branches_of_each_block() -> None:
    """The stride of each branch joined at a merge uses one polyphase choice, made where the
    authors' code makes it: after the main path's ReLU; the shortcut reuses it."""
    fixed = fixes.adaptive_polyphase(_resnet18(), size=64)
    for layer in (fixed.layer2, fixed.layer3, fixed.layer4):
        lead, follow = layer[0].relu_aps, layer[0].downsample[0].pre
        assert (lead.role, follow.role) == ("leader", "follower") and lead.group is follow.group
    assert fixed.conv1.post is None and fixed.relu_aps.role is None and fixed.maxpool.post.role is None
    bottleneck = fixes.adaptive_polyphase(_tiny_bottleneck_resnet(), size=64).layer2[0]
    assert bottleneck.conv2.stride == (1, 1) and bottleneck.relu_aps.group is bottleneck.downsample[0].pre.group
    torch.manual_seed(0)
    shuffle = fixes.adaptive_polyphase(APS_MODELS["shufflenet_v2"](), size=64).stage2[0]
    assert shuffle.branch1[0].post.group is shuffle.branch2[3].post.group


def test_aps_chooses_on_the_blurred_map_after_the_activation() -> None:
    """``blurpool+aps``: the map after the ReLU is blurred (circular padding, the authors'
    ApsPool) and the component of largest L2 norm, first in the order (0,0), (1,0), (0,1), (1,1)
    on ties, is kept."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1)).eval()
    fixed = fixes.apply_variant(model, "blurpool:3+aps", size=16)
    x = torch.randn(3, 3, 10, 10)
    with torch.no_grad():
        y = F.relu(_conv(model[0], x))
        row = torch.tensor([1.0, 2.0, 1.0])
        blurred = F.conv2d(F.pad(y, (1, 1, 1, 1), mode="circular"), (torch.outer(row, row) / 16).expand(4, 1, 3, 3),
                           groups=4)
        phases = [blurred[..., a::2, b::2] for a, b in ((0, 0), (1, 0), (0, 1), (1, 1))]
        norms = torch.stack([p.flatten(1).norm(dim=1) for p in phases], dim=1)
        expected = torch.stack([phases[i][n] for n, i in enumerate(norms.argmax(dim=1).tolist())])
        assert torch.allclose(fixed(x), expected.mean((2, 3), keepdim=True), atol=1e-6)
    # A 3x3 map is padded circularly to 4x4; components (1,0), (0,1) and (1,1) (which holds the
    # wrapped copy of x[0, 1]) all have norm 5: the authors' order picks (1,0), rows 1, 3, cols 0, 2.
    odd = torch.zeros(1, 1, 3, 3)
    odd[0, 0, 0, 1] = odd[0, 0, 1, 2] = 5.0
    assert fixes.PolyphaseDown()(odd).tolist() == [[[[0.0, 5.0], [0.0, 0.0]]]]


def test_aps_decides_near_ties_alike_at_every_shift() -> None:
    """Components (0,0) and (1,0) hold the same values in another order, (1,0) one float32 step
    larger: their norms differ by about 1e-7, below float32's summation error over 16k values.
    An even shift only reorders each component's values, so the choice must not change; norms
    summed in float32 (the authors' code) flip it for several of these maps, float64 does not."""
    down = fixes.PolyphaseDown()
    for seed in range(20):
        a = torch.rand(1, 64, 16, 16, generator=torch.Generator().manual_seed(seed))
        x = torch.zeros(1, 64, 32, 32)
        x[..., 0::2, 0::2], x[..., 1::2, 0::2] = a, a.flip(-1) * (1 + 1.2e-7)
        for shift in [(2, 0), (0, 2), (4, 6), (10, 2)]:
            assert torch.equal(down(_roll(x, shift)), _roll(down(x), (shift[0] // 2, shift[1] // 2))), (seed, shift)


def test_aps_refuses_branches_it_cannot_pair() -> None:
    class Unpaired(nn.Module):
        """Branches downsampled twice and not at all, joined: no shared choice can make them agree."""

        def __init__(self) -> None:
            super().__init__()
            self.main = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.Conv2d(4, 4, 3, 2, 1))
            self.side = nn.AdaptiveAvgPool2d(16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.main(x) + self.side(x)[:, :1]

    with pytest.raises(FixError) as info:
        fixes.adaptive_polyphase(Unpaired(), size=64)
    message = str(info.value)
    assert "\n" not in message and "add in layer <model> (Unpaired)" in message and "2 and 0 times" not in message
    assert "downsampled 0 and 2 times (strided layers main.0, main.1)" in message


def test_aps_resnet18_is_invariant_when_measured(image_files: list[str]) -> None:
    fixed = fixes.adaptive_polyphase(fixes.set_padding(_resnet18(), "circular"), size=64)
    settings = dict(weights="none", data=image_files, mode="circular", layers="none", size=64, resize=64)
    for shift, direction in (("0..3", "x"), ("1,6", "diagonal")):
        rows = transinv.measure(fixed, shift=shift, direction=direction, **settings).rows
        assert (rows[rows["metric"] == M.TOP1_AGREEMENT]["value"] == 1.0).all()
        assert rows[rows["metric"] == M.KL_DIVERGENCE]["value"].max() <= 1e-6
        assert (rows["n"] == len(image_files)).all()


# ---- all transforms -------------------------------------------------------------------------------

TRANSFORMS = {
    "blurpool": fixes.antialias,
    "blurpool-all": lambda m: fixes.antialias(m, stem=True),
    "aps": lambda m: fixes.adaptive_polyphase(m, size=64),
    "padding": lambda m: fixes.set_padding(m, "circular"),
    "all": lambda m: fixes.apply_variant(m, "padding:circular+blurpool:5+aps", size=64),
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
    names = {n for n, _ in fixed.named_modules()}
    assert {"layer1", "layer2.0", "layer2.0.conv1", "layer4.1.bn2", "fc"} <= names  # layer names kept


@pytest.mark.parametrize("training", [True, False])
def test_transforms_keep_the_train_or_eval_mode(training: bool) -> None:
    model = _resnet18().train(training)
    model.layer1.eval()  # mixed modes survive too
    for transform in TRANSFORMS.values():
        fixed = transform(model)
        assert fixed.training == training and fixed.conv1.training == training and not fixed.layer1.training
        assert all(m.training == training for m in fixed.layer2.modules())


def test_kernel_sizes_are_binomial() -> None:
    assert fixes.binomial_kernel(2)[0].tolist() == pytest.approx([0.25, 0.25])
    expected = torch.tensor([1.0, 4, 6, 4, 1])
    assert torch.allclose(fixes.binomial_kernel(5), torch.outer(expected, expected) / 256)


def test_output_sizes_follow_zhangs_layers() -> None:
    """A blur of stride 2 gives ceil(n / 2): the size of a stride-2 conv or padded 3x3 pool (so
    blocks still fit), and one more than a 2x2 average pool on odd maps (as Zhang's DenseNet)."""
    x = torch.randn(2, 3, 15, 13)
    for layer in [nn.MaxPool2d(2), nn.MaxPool2d(3, 2, 1), nn.Conv2d(3, 3, 3, 2, 1), nn.Conv2d(3, 3, 1, 2)]:
        for transform in (lambda m: fixes.antialias(m, stem=True), lambda m: fixes.adaptive_polyphase(m, size=16)):
            assert transform(layer)(x).shape == layer(x).shape, layer
    assert fixes.antialias(nn.AvgPool2d(2))(x).shape[-2:] == (8, 7)


# ---- errors and the variant spec ------------------------------------------------------------------


@pytest.mark.parametrize(
    "layer, says",
    [
        (nn.Conv2d(3, 3, 3, stride=3), "stride (3, 3)"),
        (nn.Conv2d(3, 3, 3, stride=(2, 1)), "stride (2, 1)"),
        (nn.MaxPool2d(4, 4), "stride (4, 4)"),
        (nn.Conv1d(3, 3, 3, stride=2), "only 2-D convolutions"),
    ],
)
def test_aps_refuses_layers_it_cannot_rebuild_in_one_line(layer: nn.Module, says: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Sequential(nn.ReLU(), layer))
    with pytest.raises(FixError) as info:
        fixes.adaptive_polyphase(model, size=16)
    message = str(info.value)
    assert "\n" not in message and "layer 1.1 " in message and says in message
    assert isinstance(info.value, ValueError) and isinstance(info.value, UserError)


def test_bad_arguments_raise() -> None:
    with pytest.raises(FixError, match="zeros, circular, reflect, replicate"):
        fixes.set_padding(nn.Conv2d(3, 3, 3), "wrap")
    with pytest.raises(FixError, match="from 2 to 7"):
        fixes.antialias(nn.Conv2d(3, 3, 3), kernel=8)
    with pytest.raises(FixError, match="apply padding before"):
        fixes.set_padding(fixes.antialias(nn.Conv2d(3, 3, 3, stride=2), stem=True), "circular")
    with pytest.raises(FixError, match="cannot trace Branchy with torch.fx"):

        class Branchy(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv = nn.Conv2d(3, 3, 3, 2)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.conv(x) if x.sum() > 0 else x

        fixes.antialias(Branchy())


@pytest.mark.parametrize(
    "variant, says",
    [
        ("aps+dropout", "use base, blurpool, blurpool:K, blurpool-all[:K] (K = 2..7), aps, padding:MODE"),
        ("padding:wrap", "MODE = zeros, circular, reflect, replicate"),
        ("", "use base, blurpool"),
        ("base:1", "use base, blurpool"),
        ("blurpool:9", "from 2 to 7"),
        ("blurpool-all:x", "from 2 to 7"),
        ("aps+aps", "repeats 'aps'"),
        ("blurpool+blurpool-all", "repeats 'blurpool'"),
    ],
)
def test_bad_variants_raise_one_line_saying_what_is_valid(variant: str, says: str) -> None:
    with pytest.raises(FixError) as info:
        fixes.apply_variant(nn.Identity(), variant)
    message = str(info.value)
    assert "\n" not in message and repr(variant) in message and says in message


def test_variants_parse_and_apply_in_a_fixed_order() -> None:
    assert fixes.parse_variant("base") == fixes.Variant()
    assert fixes.parse_variant("blurpool") == fixes.Variant(kernel=4)
    assert fixes.parse_variant("blurpool-all:3") == fixes.Variant(kernel=3, stem=True)
    assert fixes.parse_variant(" aps + padding:circular + blurpool:5 ") == fixes.Variant("circular", 5, False, True)
    model = _resnet18()
    base = fixes.apply_variant(model, "base")
    assert base is not model and repr(base) == repr(model)
    one = fixes.apply_variant(model, "aps+padding:circular", size=64)
    other = fixes.apply_variant(model, "padding:circular+aps", size=64)
    assert isinstance(one.relu_aps, fixes.PolyphaseDown) and one.conv1.circular
    mixed = fixes.apply_variant(model, "aps+blurpool:3", size=64)  # APS chooses on the blurred map
    assert mixed.relu_aps.lowpass.kernel.shape == (3, 3) and mixed.maxpool.post.lowpass.circular
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(one(x), other(x))
