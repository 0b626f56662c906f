import colorsys

import torch

from ssl_pipeline.augment import (color_jitter, contrastive_view, hsv_to_rgb, random_brightness_contrast,
                                  random_erase, random_grayscale, random_resized_crop_flip, random_translate_flip,
                                  rgb_to_hsv, supervised_view, uniform)

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


# ---- colour -----------------------------------------------------------------------------------------

COLOR = {"color_jitter": {"probability": 0.8, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1},
         "grayscale_probability": 0.2}


def test_hsv_conversion_agrees_with_colorsys_and_round_trips():
    pixels = torch.rand(1, 3, 1, 500, generator=generator(7))
    hsv = rgb_to_hsv(pixels)
    expected = [colorsys.rgb_to_hsv(*pixels[0, :, 0, index].tolist()) for index in range(500)]
    torch.testing.assert_close(hsv[0, :, 0].T, torch.tensor(expected), atol=1e-5, rtol=0)
    torch.testing.assert_close(hsv_to_rgb(hsv), pixels, atol=1e-5, rtol=0)


def test_a_hue_rotation_by_a_third_turns_red_into_green():
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    hsv = rgb_to_hsv(red)
    hsv[:, 0] = (hsv[:, 0] + 1 / 3) % 1
    torch.testing.assert_close(hsv_to_rgb(hsv).flatten(), torch.tensor([0.0, 1.0, 0.0]))


def test_color_jitter_changes_the_chosen_share_of_images_and_stays_in_range():
    images = batch(size=400, channels=3, height=6, width=6)
    never = color_jitter(images, {**COLOR["color_jitter"], "probability": 0.0}, generator())
    assert torch.equal(never, images)
    jittered = color_jitter(images, COLOR["color_jitter"], generator())
    changed = (jittered - images).abs().amax(dim=(1, 2, 3)) > 1e-4
    assert 0.72 < changed.float().mean().item() < 0.88  # probability 0.8
    assert jittered.min() >= 0 and jittered.max() <= 1


def test_random_grayscale_makes_the_chosen_images_grey_with_luma_weights():
    images = batch(size=400, channels=3, height=4, width=4)
    always = random_grayscale(images, 1.0, generator())
    luma = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    for channel in range(3):
        torch.testing.assert_close(always[:, channel], luma)
    grey = (random_grayscale(images, 0.2, generator()) == luma.unsqueeze(1)).all(dim=(1, 2, 3))
    assert 0.14 < grey.float().mean().item() < 0.26


def test_colour_distortion_runs_on_colour_views_only_and_draws_nothing_for_grey_ones():
    """So 1-channel data (the default Fashion-MNIST run) get exactly the views they got before."""
    grey, colour = batch(channels=1), batch(channels=3)
    plain = {**CONTRASTIVE, "color_jitter": {**COLOR["color_jitter"], "probability": 0.0}, "grayscale_probability": 0.0}
    with_colour = {**CONTRASTIVE, **COLOR}
    assert torch.equal(contrastive_view(grey, with_colour, generator()), contrastive_view(grey, plain, generator()))
    assert not torch.equal(contrastive_view(colour, with_colour, generator()),
                           contrastive_view(colour, plain, generator()))


def test_color_jitter_gives_the_same_images_whether_it_follows_its_order_or_selects_on_the_device():
    """On CUDA color_jitter keeps its drawn order on the device (reading it would sync) and selects
    each position's jitter with torch.where; on the CPU it follows the order. Both must draw alike and
    give the same images bit for bit, and leave the generator where the other leaves it."""
    odd = {"probability": 0.5, "brightness": 0.3, "contrast": 0.7, "saturation": 0.1, "hue": 0.45}
    for settings in (COLOR["color_jitter"], odd):
        for seed in range(6):
            for shape in [(1, 3, 1, 1), (7, 3, 5, 9), (32, 3, 16, 12)]:
                images = torch.rand(*shape, generator=generator(100 + seed))
                views, next_draws = [], []
                for order_on_device in (False, True):
                    drawn = generator(seed)
                    views.append(color_jitter(images, settings, drawn, order_on_device=order_on_device))
                    next_draws.append(torch.rand(4, generator=drawn))
                assert torch.equal(views[0], views[1]), (settings, seed, shape)
                assert torch.equal(next_draws[0], next_draws[1])


def test_each_colour_jitter_draws_its_factor_at_its_place_in_the_drawn_order():
    """The order is drawn first, then one (B,) draw per position, as uniform() makes it: brightness
    scales by the draw at the position the order gives it. Grey images, which the other three jitters
    at strength 0 leave as they are, show its factor."""
    settings = {"probability": 1.0, "brightness": 0.4, "contrast": 0.0, "saturation": 0.0, "hue": 0.0}
    images = torch.full((64, 3, 2, 2), 0.5)
    drawn = generator(3)
    order = torch.randperm(4, generator=drawn).tolist()
    draws = [uniform(1 - 0.4, 1 + 0.4, 64, drawn, "cpu") for _ in order]
    expected = (0.5 * draws[order.index(0)]).view(64, 1, 1, 1).expand_as(images)
    for order_on_device in (False, True):
        view = color_jitter(images, settings, generator(3), order_on_device=order_on_device)
        torch.testing.assert_close(view, expected, atol=1e-6, rtol=0)
