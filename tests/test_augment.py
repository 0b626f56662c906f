import torch

from ssl_pipeline.augment import (contrastive_view, random_brightness_contrast, random_erase,
                                  random_resized_crop_flip, random_translate_flip, supervised_view)

CONTRASTIVE = {"crop_scale": [0.3, 1.0], "crop_ratio": [0.75, 1.3333], "flip": True,
               "brightness_contrast": 0.4, "erase_probability": 0.5}
SUPERVISED = {"max_shift": 2, "flip": True, "erase_probability": 0.5}


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def batch(size=16, channels=1, height=28, width=20):
    return torch.rand(size, channels, height, width, generator=generator(123))


def test_views_keep_shape_dtype_and_range():
    images = batch(channels=3)
    for view in (contrastive_view(images, CONTRASTIVE, generator()),
                 supervised_view(images, SUPERVISED, generator())):
        assert view.shape == images.shape and view.dtype == torch.float32
        assert view.min() >= 0.0 and view.max() <= 1.0


def test_views_are_random_per_image_but_reproducible():
    images = batch()
    first = contrastive_view(images, CONTRASTIVE, generator(5))
    again = contrastive_view(images, CONTRASTIVE, generator(5))
    other = contrastive_view(images, CONTRASTIVE, generator(6))
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first, other)
    assert not torch.allclose(first[0], first[1])


def test_full_crop_without_flip_is_the_identity():
    images = batch()
    same = random_resized_crop_flip(images, (1.0, 1.0), (1.0, 1.0), flip=False, generator=generator())
    torch.testing.assert_close(same, images, atol=1e-5, rtol=0)


def test_full_crop_with_flip_mirrors_about_half_the_images():
    images = batch(size=400)
    out = random_resized_crop_flip(images, (1.0, 1.0), (1.0, 1.0), flip=True, generator=generator())
    mirrored = torch.isclose(out, images.flip(-1), atol=1e-5).flatten(1).all(dim=1)
    unchanged = torch.isclose(out, images, atol=1e-5).flatten(1).all(dim=1)
    assert bool((mirrored | unchanged).all())
    assert 150 < int(mirrored.sum()) < 250


def test_translation_moves_content_by_at_most_max_shift():
    images = torch.zeros(64, 1, 9, 9)
    images[:, :, 4, 4] = 1.0
    out = random_translate_flip(images, max_shift=2, flip=False, generator=generator())
    positions = out.flatten(1).argmax(dim=1)
    rows, cols = positions // 9, positions % 9
    assert out.sum(dim=(1, 2, 3)).eq(1).all()
    assert ((rows - 4).abs() <= 2).all() and ((cols - 4).abs() <= 2).all()
    assert len(set(positions.tolist())) > 10


def test_erase_blanks_one_rectangle_in_the_chosen_images_only():
    images = torch.ones(200, 1, 16, 16)
    out = random_erase(images, probability=0.5, max_area=0.25, generator=generator())
    erased = (out == 0).flatten(1).sum(dim=1)
    assert 60 < int((erased > 0).sum()) < 140
    assert int(erased.max()) <= 0.25 * 256 + 16


def test_brightness_contrast_changes_values_and_stays_in_range():
    images = batch()
    out = random_brightness_contrast(images, 0.4, generator())
    assert not torch.allclose(out, images)
    assert out.min() >= 0 and out.max() <= 1
