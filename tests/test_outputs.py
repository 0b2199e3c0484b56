"""Known answers for token layers and for outputs that are not class logits: constructed models
whose true values are exact by design."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

import transinv
from transinv.engine import metrics as M
from transinv.examples import FixedMap, WindowMixer, token_mixer, window_mixer
from transinv.engine.layers import fits, probe_layers, token_grid, to_nchw

SMALL = dict(size=32, resize=48, weights="none", seed=0, mode="circular")


def _rows(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    return rows[rows["metric"] == metric]


def test_token_grid_finds_prefix_tokens_and_patch_size() -> None:
    assert token_grid(197, 224, None) == (1, 14, 16)
    assert token_grid(198, 224, None) == (2, 14, 16)  # class + distillation (DeiT)
    assert token_grid(64 + 5, 32, 256 + 5) == (5, 8, 4)  # class + 4 registers, grown grid checked
    assert token_grid(64, 32, 100) is None  # the grid does not grow as a patch grid would
    assert token_grid(3, 32, None) is None  # a 1x1 grid is no grid


def test_token_layers_are_mapped_to_the_patch_grid_with_the_class_token_dropped() -> None:
    model = token_mixer().eval()
    probe = probe_layers(model, 32)
    blocks = {layer.name: layer for layer in probe.layers if layer.name.startswith("blocks.")}
    assert {"blocks.0", "blocks.1"} <= {name for name, layer in blocks.items() if layer.default}
    block = blocks["blocks.0"]
    assert (block.tokens, block.height, block.width, block.stride, block.channels) == (1, 8, 8, (4, 4), 32)
    assert "1 token (class)" in probe.token_note
    tokens = torch.arange(2 * 65 * 3.0).reshape(2, 65, 3)
    grid = to_nchw(tokens, block)
    assert grid.shape == (2, 3, 8, 8)
    assert torch.equal(grid[1, :, 2, 5], tokens[1, 1 + 2 * 8 + 5])  # row-major after the class token


def test_dropped_tokens_are_named_only_when_a_token_layer_is_measured(few_images: Path) -> None:
    notes: list[str] = []
    transinv.measure("example:token_mixer", data=str(few_images), shift="0,4", layers="blocks.0", warn=notes.append,
                     **SMALL)
    assert any("token layers mapped back to their patch grid, the leading 1 token (class) dropped" in n for n in notes)
    notes.clear()
    transinv.measure("example:token_mixer", data=str(few_images), shift="0,4", layers="patch_embed", warn=notes.append,
                     **SMALL)
    assert not any("mapped back" in n for n in notes)


def test_token_model_is_exactly_equivariant_at_multiples_of_the_patch_size(few_images: Path) -> None:
    result = transinv.measure("example:token_mixer", data=str(few_images), shift="0..8", layers="default",
                              **SMALL)
    rows = result.rows
    error = _rows(rows, M.EQUIVARIANCE_ERROR)
    blocks = error[error["layer"].str.startswith("blocks.")]
    assert set(blocks["shift_x"]) == {0, 4, 8}  # only the aligned shifts
    assert set(blocks["layer"]) == {"blocks.0", "blocks.1"}
    assert (blocks["value"] <= 1e-5).all()
    pooled = _rows(rows, M.POOLED_INVARIANCE_ERROR)
    assert (pooled[pooled["shift_x"] % 4 == 0]["value"] <= 1e-5).all()
    assert (pooled[pooled["shift_x"] % 4 != 0]["value"] > 1e-3).all()  # unaligned shifts change the patches
    top1 = _rows(rows, M.TOP1_AGREEMENT)
    assert (top1[top1["shift_x"] % 4 == 0]["value"] == 1.0).all()


def test_a_map_fits_the_input_at_a_whole_stride() -> None:
    assert fits(224, 56) and fits(224, 7) and fits(225, 113) and fits(299, 150) and fits(64, 1)
    assert not fits(224, 49)  # Swin's 7x7 window attention scores at 224 px
    assert not fits(224, 197)  # a ViT's token-by-token attention


@pytest.mark.parametrize("window, size, probes", [(4, 32, "two sizes"), (7, 56, "one size: 88 px fits no window")])
def test_window_attention_scores_are_no_layers_and_window_blocks_are(window: int, size: int, probes: str) -> None:
    # the scores are (images x windows, heads, w², w²): the batch axis holds windows, except where one
    # window covers the map (the second stage here), and then a w² side fits no whole stride (56 px)
    # or the batch axis differs at the second probe size (32 px)
    probe = probe_layers(WindowMixer(window=window).eval(), size)
    names = {layer.name for layer in probe.layers}
    assert not any("softmax" in name for name in names)
    blocks = {layer.name: layer for layer in probe.layers if layer.default and ".attn" not in layer.name
              and layer.name.startswith("stage")}
    assert sorted(blocks) == ["stage1.0", "stage1.1", "stage2.0", "stage2.1"]
    assert [(b.stride, b.height, b.channels_last) for b in blocks.values()] == (
        [((4, 4), size // 4, True)] * 2 + [((8, 8), size // 8, True)] * 2)


def test_window_blocks_are_exactly_equivariant_at_whole_windows(few_images: Path) -> None:
    result = transinv.measure("example:window_mixer", data=str(few_images), shift="0,8,16,32", layers="default",
                              **{**SMALL, "size": 64, "resize": 72})
    error = _rows(result.rows, M.EQUIVARIANCE_ERROR).set_index(["layer", "shift_x"])["value"]
    for block in ("stage1.0", "stage1.1"):  # windows of 16 px
        assert error[block, 16] <= 1e-5 and error[block, 32] <= 1e-5 and error[block, 8] > 1e-3
    for block in ("stage2.0", "stage2.1"):  # windows of 32 px
        assert error[block, 32] <= 1e-5 and error[block, 16] > 1e-3 and error[block, 8] > 1e-3
    top1 = _rows(result.rows, M.TOP1_AGREEMENT).set_index("shift_x")["value"]
    assert top1[32] == 1.0


def test_circular_encoder_embedding_is_exactly_invariant(few_images: Path) -> None:
    result = transinv.measure("example:circular_encoder", data=str(few_images), shift="0..3", direction="grid",
                              layers="none", **SMALL)
    rows = result.rows
    assert set(rows["metric"]) == {M.COSINE_DISTANCE, M.EMBEDDING_CHANGE, M.NN_AGREEMENT}
    assert len(_rows(rows, M.COSINE_DISTANCE)) == 16
    assert (_rows(rows, M.COSINE_DISTANCE)["value"] <= 1e-9).all()
    assert (_rows(rows, M.EMBEDDING_CHANGE)["value"] <= 1e-5).all()
    assert (_rows(rows, M.NN_AGREEMENT)["value"] == 1.0).all()
    assert (rows["n"] == 6).all()


def test_constant_embedding_retrieves_nothing_and_task_overrides_the_kind(few_images: Path) -> None:
    result = transinv.measure("example:constant", data=str(few_images), shift="0,2", task="embedding", layers="none",
                              **SMALL)
    rows = result.rows
    assert (_rows(rows, M.COSINE_DISTANCE)["value"] == 0.0).all()
    assert (_rows(rows, M.NN_AGREEMENT)["value"] == 0.0).all()  # six identical embeddings: every one ties


def test_compare_embeddings_known_values() -> None:
    from transinv.models.outputs import compare_embeddings

    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cur = torch.tensor([[0.0, 2.0], [0.0, 3.0]])  # the first now points at the second's reference
    out = compare_embeddings(ref, cur, (1, 0), False)
    assert out["cosine_distance"].tolist() == [1.0, 0.0]
    assert torch.allclose(out["embedding_change"], torch.tensor([5 ** 0.5, 2.0], dtype=torch.float64))
    assert set(out) == {"cosine_distance", "embedding_change"}
    same = torch.tensor([[0.1, 0.7, 0.3], [3.0, -1.0, 2.0]])  # 1 - cos would leave ~1e-17 of rounding
    assert compare_embeddings(same, same.clone(), (0, 0), False)["cosine_distance"].tolist() == [0.0, 0.0]
    near = compare_embeddings(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1e-6]]), (1, 0), False)
    assert abs(near["cosine_distance"].item() - 0.5e-12) < 1e-18  # 1 - cos(1e-6 rad): no cancellation
    zero = compare_embeddings(torch.zeros(1, 2), torch.ones(1, 2), (1, 0), False)
    assert zero["cosine_distance"].isnan().all()


def test_gallery_retrieves_among_the_whole_set_and_ties_fail() -> None:
    from transinv.engine.distributed import Context
    from transinv.engine.gallery import Gallery

    ids = torch.tensor([7, 2, 5])  # any order, gaps allowed
    gallery = Gallery.gather(ids, torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]), Context(), torch.device("cpu"))
    shifted = torch.tensor([[1.0, 0.1], [2.0, 0.0], [0.1, 1.0], [0.0, 3.0]])
    own = torch.tensor([2, 2, 5, 7])  # 1: nearest is 2's; 2: exactly 2's; 3: nearer 7's than 5's; 4: 7's exactly
    assert gallery.own_is_nearest(shifted, own).tolist() == [1.0, 1.0, 0.0, 1.0]
    tied = Gallery.gather(torch.tensor([0, 1]), torch.tensor([[1.0, 0.0], [2.0, 0.0]]), Context(), torch.device("cpu"))
    assert tied.own_is_nearest(torch.tensor([[1.0, 0.0]]), torch.tensor([0])).tolist() == [0.0]


def test_nn_agreement_searches_the_whole_set_whatever_the_batch(few_images: Path, tmp_path: Path) -> None:
    """Six photos and a copy of one: an exactly invariant encoder retrieves all but the identical
    pair (a tie fails), 5/7, in batches of one image as in one batch."""
    folder = tmp_path / "seven"
    shutil.copytree(few_images, folder)
    shutil.copy(next(few_images.iterdir()), folder / "n01440764_copy.JPEG")
    for batch_size in (1, 7):
        rows = transinv.measure("example:circular_encoder", data=str(folder), shift="0,1,3", layers="none",
                                **{**SMALL, "batch_size": batch_size}).rows
        assert _rows(rows, M.NN_AGREEMENT)["value"].tolist() == [5 / 7] * 3


def test_circular_segmenter_maps_move_exactly_with_the_input(few_images: Path) -> None:
    result = transinv.measure("example:circular_segmenter", data=str(few_images), shift="-2..2", direction="grid",
                              layers="none", **SMALL)
    rows = result.rows
    assert set(rows["metric"]) == {M.PIXEL_AGREEMENT, M.PIXEL_KL_DIVERGENCE, M.SEGMENTATION_CONSISTENCY}
    assert (_rows(rows, M.PIXEL_AGREEMENT)["value"] == 1.0).all()
    assert (_rows(rows, M.PIXEL_KL_DIVERGENCE)["value"] <= 1e-9).all()
    assert _rows(rows, M.SEGMENTATION_CONSISTENCY)["value"].item() == 1.0


def test_a_map_that_does_not_move_agrees_with_itself_shifted(few_images: Path) -> None:
    torch.manual_seed(0)
    model = FixedMap(classes=3, size=32)
    result = transinv.measure(model, data=str(few_images), shift="0..3", layers="none", **SMALL)
    classes = model.scores.argmax(dim=0)
    for dx in range(4):  # the shifted view's map at p + d against the reference's at p: both the fixed map
        expected = (classes.roll(-dx, dims=1) == classes).double().mean().item()
        got = _rows(result.rows, M.PIXEL_AGREEMENT).query(f"shift_x == {dx}")["value"].item()
        assert got == pytest.approx(expected, abs=1e-12)
    assert _rows(result.rows, M.PIXEL_AGREEMENT).query("shift_x == 1")["value"].item() < 0.9


def test_torchvision_segmentation_models_load_and_measure_their_out_maps(few_images: Path) -> None:
    from transinv.models import load_model

    assert load_model("fcn_resnet50", "none").output == "segmentation"
    result = transinv.measure("lraspp_mobilenet_v3_large", data=str(few_images), shift="0,8", layers="none",
                              num_images=2, size=64, resize=80, weights="none", mode="crop")
    rows = result.rows
    assert set(rows["metric"]) == {M.PIXEL_AGREEMENT, M.PIXEL_KL_DIVERGENCE, M.SEGMENTATION_CONSISTENCY}
    agreement = _rows(rows, M.PIXEL_AGREEMENT).set_index("shift_x")["value"]
    assert agreement[0] == 1.0 and 0.0 <= agreement[8] <= 1.0


def test_timm_vit_blocks_get_rows_at_the_patch_stride_and_encoders_are_embeddings(few_images: Path) -> None:
    pytest.importorskip("timm")
    result = transinv.measure("timm:test_vit", data=str(few_images), shift="0,8", layers="default", num_images=2,
                              weights="none", mode="circular")
    error = _rows(result.rows, M.EQUIVARIANCE_ERROR)
    assert {"blocks.0", "blocks.1"} <= set(error["layer"])
    encoder = transinv.measure("timm:convnext_tiny.dinov3_lvd1689m", data=str(few_images), shift="0,8",
                               layers="none", num_images=2, size=32, resize=32, weights="none", mode="circular")
    assert M.COSINE_DISTANCE in set(encoder.rows["metric"])


def test_class_based_set_metrics_are_refused_for_other_output_kinds(few_images: Path) -> None:
    with pytest.raises(transinv.UserError, match="compares top-1 classes: not for --task embedding"):
        transinv.measure("example:circular_encoder", data=str(few_images), shift="0,1", consistency="-2..2",
                         layers="none", **SMALL)
    with pytest.raises(transinv.UserError, match="random_shifts compares top-1 classes or segmentation maps: not fo"):
        transinv.measure("example:circular_encoder", data=str(few_images), shift="0,1", random_shifts=2,
                         layers="none", **SMALL)
    with pytest.raises(transinv.UserError, match="draws whole pixels: drop --subpixel"):
        transinv.measure("example:circular_segmenter", data=str(few_images), shift="-2,2", random_shifts=2,
                         subpixel="fourier", layers="none", **SMALL)
    with pytest.raises(transinv.UserError, match="random_shifts compares top-1 classes or segmentation maps"):
        transinv.measure("no_such_model", task="embedding", random_shifts=2)  # refused before any model is loaded


# Rojas-Gomez et al.'s mASSC: random draws per image (random_segmentation_consistency)
RANDOM = dict(SMALL, shift="-9,9", direction="grid", random_shifts=5, layers="none")


def _agreement_at(classes: torch.Tensor, dx: int, dy: int, circular: bool) -> float:
    """Pixel by pixel: the share of positions p (wrapped, or inside both frames) where a map that
    ignores its input has the same class at p + d (the shifted view's) as at p (the reference's)."""
    h, w = classes.shape
    same = total = 0
    for y in range(h):
        for x in range(w):
            ty, tx = y + dy, x + dx
            if circular:
                ty, tx = ty % h, tx % w
            elif not (0 <= ty < h and 0 <= tx < w):
                continue
            total += 1
            same += int(classes[ty, tx] == classes[y, x])
    return same / total


@pytest.mark.parametrize("mode", ["circular", "pad"])
def test_random_draws_of_a_fixed_map_give_the_computed_agreement(few_images: Path, mode: str) -> None:
    """Each image's own draws (as ShiftPlan.random_draws makes them), the map at p + d against p."""
    from transinv.engine.shifts import ShiftPlan, make_shift_set

    torch.manual_seed(0)
    model = FixedMap(classes=2, size=32)
    rows = transinv.measure(model, data=str(few_images), **dict(RANDOM, mode=mode)).rows
    got = _rows(rows, M.RANDOM_SEGMENTATION_CONSISTENCY)
    assert len(got) == 1 and got["n"].item() == 6
    plan = ShiftPlan(tuple(make_shift_set("-9,9", "grid")), 32, mode, random_shifts=5)
    draws = plan.random_draws(torch.arange(6), seed=0)
    assert len({d for image in draws for d in image}) > 20  # per image: 30 draws, nearly all different
    classes = model.scores.argmax(dim=0)
    per_image = [sum(_agreement_at(classes, dx, dy, mode == "circular") for dx, dy in image) / 5 for image in draws]
    assert got["value"].item() == pytest.approx(sum(per_image) / 6, abs=1e-12)
    assert got["value"].item() < 0.9
    moved = _rows(rows, M.PIXEL_AGREEMENT).query("shift_x != 0 or shift_y != 0")["value"]
    assert len(moved) == 4  # the set's own corners: its mean takes no draw
    assert _rows(rows, M.SEGMENTATION_CONSISTENCY)["value"].item() == pytest.approx(moved.mean(), abs=1e-12)


def test_random_draws_of_an_equivariant_segmenter_agree_exactly(few_images: Path) -> None:
    """Circular convolutions under circular draws, and a per-pixel (1x1) map under pad and crop
    draws, move exactly with the input: 1 at every draw (a sign slip in the overlap would not be)."""
    circular = transinv.measure("example:circular_segmenter", data=str(few_images), **RANDOM).rows
    assert _rows(circular, M.RANDOM_SEGMENTATION_CONSISTENCY)["value"].item() == 1.0
    torch.manual_seed(0)
    pointwise = torch.nn.Conv2d(3, 4, 1)
    for mode in ("pad", "crop"):
        rows = transinv.measure(pointwise, data=str(few_images), **dict(RANDOM, mode=mode, resize=56)).rows
        assert _rows(rows, M.RANDOM_SEGMENTATION_CONSISTENCY)["value"].item() == 1.0
        assert _rows(rows, M.SEGMENTATION_CONSISTENCY)["value"].item() == 1.0


def test_random_segmentation_draws_do_not_depend_on_batching(few_images: Path) -> None:
    torch.manual_seed(0)
    model = FixedMap(classes=2, size=32)
    values = [_rows(transinv.measure(model, data=str(few_images), batch_size=size, **RANDOM).rows,
                    M.RANDOM_SEGMENTATION_CONSISTENCY)["value"].item() for size in (1, 4, 32)]
    assert values[1] == pytest.approx(values[0], abs=1e-12) and values[2] == pytest.approx(values[0], abs=1e-12)
    other = transinv.measure(model, data=str(few_images), batch_size=4, **dict(RANDOM, seed=1)).rows
    assert abs(_rows(other, M.RANDOM_SEGMENTATION_CONSISTENCY)["value"].item() - values[0]) > 1e-6  # new draws
    plain = transinv.measure(model, data=str(few_images), **dict(RANDOM, random_shifts=0)).rows
    assert M.RANDOM_SEGMENTATION_CONSISTENCY not in set(plain["metric"])
