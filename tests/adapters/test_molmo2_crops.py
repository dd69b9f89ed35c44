"""Molmo2's image processor without torchvision (`embedlens.adapters.molmo2_crops`) against HF's own processing code,
and by hand.

HF's `Molmo2ImageProcessor._preprocess` is run here itself (its grouping, overlapping crops, index grids, pooling
indices and patchification), on a stand-in whose ``resize`` is torchvision's float bilinear without antialias
(``interpolate``, the primitive both sides share) and whose ``normalize`` is torchvision's; the port must give the
same tensors, bit for bit. The by-hand tests check the crops and the pooling against the image itself.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_utils import PILImageResampling, SizeDict
from transformers.models.molmo2.image_processing_molmo2 import Molmo2ImageProcessor

from embedlens.adapters.molmo2_crops import Molmo2ImageProcessorNoTorchvision

MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


class _HFStandIn:
    """HF's `Molmo2ImageProcessor` methods, with torchvision's two primitives written out in torch."""

    _build_overlapping_crops = Molmo2ImageProcessor._build_overlapping_crops
    _image_batch_to_patches_and_grids = Molmo2ImageProcessor._image_batch_to_patches_and_grids
    _fuse_mean_std_and_rescale_factor = TorchvisionBackend._fuse_mean_std_and_rescale_factor
    rescale_and_normalize = TorchvisionBackend.rescale_and_normalize

    def resize(self, image, size, resample=None, antialias=True):
        # torchvision.transforms.v2.functional.resize on a float tensor, bilinear: interpolate, align_corners=False
        assert resample == PILImageResampling.BILINEAR and image.dtype == torch.float32
        return torch.nn.functional.interpolate(image, size=(size.height, size.width), mode="bilinear",
                                               align_corners=False, antialias=antialias)

    def normalize(self, image, mean, std, inplace=False):
        # torchvision's normalize: subtract the mean, divide by the std, per channel
        return (image - torch.as_tensor(mean)[:, None, None]) / torch.as_tensor(std)[:, None, None]


def _hf(images, crop, patch, max_crops, margins, pool):
    tensors = [torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous() for im in images]
    return Molmo2ImageProcessor._preprocess(
        _HFStandIn(), tensors, do_resize=True, size=SizeDict(height=crop, width=crop), resample=PILImageResampling.BILINEAR,
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=tuple(MEAN), image_std=tuple(STD), do_convert_rgb=True,
        max_crops=max_crops, overlap_margins=margins, patch_size=patch, pooling_size=pool, disable_grouping=False,
        return_tensors="pt")


def _ours(crop, patch, max_crops, margins, pool):
    return Molmo2ImageProcessorNoTorchvision(size={"height": crop, "width": crop}, patch_size=patch, max_crops=max_crops,
                                             overlap_margins=margins, pooling_size=pool, image_mean=MEAN, image_std=STD)


SIZES = [(12, 16), (40, 70), (70, 40), (5, 120), (28, 28), (90, 91), (13, 13), (40, 70)]  # a repeated shape: HF groups it


@pytest.mark.parametrize("crop,patch,max_crops,margins,pool", [
    (28, 4, 4, [1, 1], [2, 2]),
    (28, 4, 8, [2, 1], [3, 3]),  # unequal margins; a pool that does not divide the grid (padding with -1)
    (24, 4, 6, [0, 0], [2, 3]),  # no overlap
    (378, 14, 8, [4, 4], [2, 2]),  # the released checkpoints' values
])
def test_equals_hfs_preprocess(crop, patch, max_crops, margins, pool):
    rng = np.random.default_rng(0)
    sizes = SIZES if crop < 100 else [(300, 500), (600, 200)]
    images = [Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)) for h, w in sizes]
    ip = _ours(crop, patch, max_crops, margins, pool)
    ours, theirs = ip(images, return_tensors="pt"), _hf(images, crop, patch, max_crops, margins, pool)
    assert set(ours) == set(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    # the token and crop counts HF's processor puts in the prompt
    for (h, w), grid, n in zip(sizes, ours["image_grids"].tolist(), ours["image_num_crops"].tolist()):
        hf_ip = Molmo2ImageProcessor(size={"height": crop, "width": crop}, patch_size=patch, max_crops=max_crops,
                                     overlap_margins=margins, pooling_size=pool)
        assert ip.get_image_grid_and_crops(h, w) == hf_ip.get_image_grid_and_crops(h, w) == (grid, n)
        assert ip.get_number_of_image_patches(h, w) == grid[0] * grid[1] + grid[2] * grid[3]
    assert len(ours["image_token_pooling"]) == sum(a * b + c * d for a, b, c, d in ours["image_grids"].tolist())
    assert len(ours["pixel_values"]) == int(ours["image_num_crops"].sum()) and max(ours["image_num_crops"].tolist()) > 2


def test_crops_and_pooling_by_hand():
    """A 40 x 56 image, 24-px crops of 4-px patches, margins of 1 patch (a 16-px window), 2 x 2 pooling, up to 6
    crops: HF's tiling rule picks 2 x 3 crops, a canvas of 2 x 3 windows + the margins = 40 x 56 px (the image's
    own size: nothing is resized). Crop (i, j) is the canvas's [16 i : 16 i + 24, 16 j : 16 j + 24]. Every pooling
    index of a high-res token names the canvas patch of its place in the 10 x 14 grid; a token straddling a seam
    between crops pools patches of each."""
    arr = (np.random.default_rng(1).random((40, 56, 3)) * 255).astype(np.uint8)
    ip = _ours(24, 4, 6, [1, 1], [2, 2])
    out = ip([Image.fromarray(arr)], return_tensors="pt")
    (lr, lc, hr, hc), = out["image_grids"].tolist()
    n_crops = int(out["image_num_crops"])
    assert (lr, lc) == (3, 3) and n_crops == 1 + 2 * 3 and (hr, hc) == (5, 7)  # 10 x 14 patches pooled 2 x 2
    x = (torch.from_numpy(arr).float() - 255 * torch.tensor(MEAN)) / (255 * torch.tensor(STD))  # [40, 56, 3]: no resize
    pv = out["pixel_values"].reshape(n_crops, 6, 6, 4, 4, 3)  # crop, patch row, patch col, pixel row, pixel col, rgb
    for i in range(2):
        for j in range(3):
            crop = pv[1 + 3 * i + j].permute(0, 2, 1, 3, 4).reshape(24, 24, 3)
            torch.testing.assert_close(crop, x[16 * i: 16 * i + 24, 16 * j: 16 * j + 24], atol=1e-6, rtol=0)
    # the canvas patch (r, c) each high-res pooling index names must hold that canvas patch's pixels
    flat = out["pixel_values"]  # [crops, 36, 48]
    high = out["image_token_pooling"][lr * lc:]
    for t in range(hr * hc):
        r0, c0 = 2 * (t // hc), 2 * (t % hc)
        for k, idx in enumerate(high[t].tolist()):
            r, c = r0 + k // 2, c0 + k % 2
            crop, p = divmod(idx, 36)
            assert crop >= 1, (t, idx)
            want = x[4 * r: 4 * r + 4, 4 * c: 4 * c + 4].reshape(-1)
            torch.testing.assert_close(flat[crop, p], want, atol=1e-6, rtol=0)
    crops_of = lambda t: {i // 36 for i in high[t].tolist()}  # noqa: E731
    # canvas patch rows 0..4 come from the first row of crops (its trailing margin row dropped), 5..9 from the second
    # (its leading margin row dropped); columns 0..4 from the first column of crops, 5..8 the second, 9..13 the third.
    # So pooled row 2 (patch rows 4, 5) and pooled columns 2 (4, 5) and 4 (8, 9) straddle two crops each
    assert crops_of(0) == {1} and crops_of(4) == {2, 3} and crops_of(2 * hc) == {1, 4}
    assert crops_of(2 * hc + 2) == {1, 2, 4, 5}  # the token at the crossing pools patches of four crops
    # the low-res view: the whole image resized to one crop, its tokens first, each pooling its own 2 x 2 block
    low = out["image_token_pooling"][: lr * lc]
    assert low.tolist()[0] == [0, 1, 6, 7] and low.tolist()[-1] == [28, 29, 34, 35]


@pytest.mark.parametrize("kwargs,match", [
    (dict(do_normalize=False), "must stay True"),
    (dict(size={"height": 24, "width": 28}), "must be square"),
    (dict(overlap_margins=[3, 3]), "leave no window"),
    (dict(resample=PILImageResampling.BICUBIC), "must be BILINEAR"),
])
def test_settings_it_cannot_follow_are_refused(kwargs, match):
    ip = Molmo2ImageProcessorNoTorchvision(**{**dict(size={"height": 24, "width": 24}, patch_size=4), **kwargs})
    with pytest.raises(ValueError, match=match):
        ip([Image.fromarray(np.zeros((10, 10, 3), np.uint8))], return_tensors="pt")
