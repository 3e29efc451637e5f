"""Differentiable augmentation (train.augment): what each transform does to an image, exactly."""

import pytest
import torch

from dcgan_dist.gan import augment


def _images(b=16, c=1, s=16):
    return torch.rand(b, c, s, s, generator=torch.Generator().manual_seed(1)) * 2 - 1 + 5  # no pixel is 0


def _shift(img, dy, dx):
    """img [C, H, W] moved down by dy and right by dx, zeros where nothing moved in."""
    out = torch.zeros_like(img)
    h, w = img.shape[1:]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        img[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def test_translation_is_an_integer_shift_with_zero_fill_within_an_eighth():
    x = _images()
    y = augment.augment(x, ("translation",), torch.Generator().manual_seed(0))
    shifts = set()
    for img, out in zip(x, y):
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if torch.equal(out, _shift(img, dy, dx))]
        assert len(found) == 1, "not a shift of at most 16/8 = 2 pixels"
        shifts.add(found[0])
    assert len(shifts) > 5  # each image draws its own shift


def test_cutout_zeroes_one_square_of_half_the_size():
    x = _images(b=32)
    y = augment.augment(x, ("cutout",), torch.Generator().manual_seed(0))
    for img, out in zip(x, y):
        zero = out[0] == 0
        assert torch.equal(out[:, ~zero], img[:, ~zero])  # everything else untouched
        rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
        assert zero.sum() == len(rows) * len(cols)  # one axis-aligned rectangle ...
        assert len(rows) <= 8 and len(cols) <= 8  # ... of at most 8x8, clipped at the border
        assert rows.diff().eq(1).all() and cols.diff().eq(1).all()
    assert (y == 0).float().mean() > 0.15  # not clipped away everywhere


def test_color_changes_brightness_and_contrast_per_image_and_keeps_rgb_shape():
    x = _images(b=8, c=3)
    y = augment.augment(x, ("color",), torch.Generator().manual_seed(0))
    assert y.shape == x.shape and not torch.allclose(y, x)
    assert len({round(v, 4) for v in (y - x).mean((1, 2, 3)).tolist()}) == 8


def test_gradients_flow_and_the_generator_makes_it_reproducible():
    x = _images().requires_grad_(True)
    policy = augment.parse("translation, cutout,color")
    y1 = augment.augment(x, policy, torch.Generator().manual_seed(3))
    y2 = augment.augment(x, policy, torch.Generator().manual_seed(3))
    assert torch.equal(y1, y2)
    y1.sum().backward()
    assert x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()


def test_layout_is_kept():
    x = _images().contiguous(memory_format=torch.channels_last)
    y = augment.augment(x, ("translation", "cutout"), torch.Generator().manual_seed(0))
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_parse():
    assert augment.parse("") == ()
    assert augment.parse("translation,cutout") == ("translation", "cutout")
    with pytest.raises(ValueError, match="'flip'"):
        augment.parse("translation,flip")
