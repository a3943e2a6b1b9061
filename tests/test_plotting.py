import numpy as np
import pytest
import torch

from lecturekit import plotting


def test_moving_average_by_hand():
    got = plotting.moving_average([1, 2, 3, 4, 5], window=2)
    assert np.allclose(got, [1, 1.5, 2.5, 3.5, 4.5])
    assert np.allclose(plotting.moving_average([3, 3, 3], window=10), [3, 3, 3])
    with pytest.raises(ValueError):
        plotting.moving_average([1], window=0)


def test_overlay_blends_in_rgb():
    image = torch.zeros(3, 4, 4)
    heat = torch.zeros(4, 4)
    heat[0, 0] = 2.0
    out = plotting.overlay(image, heat, alpha=1.0, cmap="gray")
    assert out.shape == (4, 4, 3)
    assert np.allclose(out[0, 0], 1) and np.allclose(out[1, 1], 0)
    with pytest.raises(ValueError, match="size"):
        plotting.overlay(image, torch.zeros(5, 5))


def test_figures_have_the_right_panels():
    import matplotlib.pyplot as plt

    fig = plotting.show_images(torch.rand(5, 3, 8, 8), titles=list("abcde"), ncols=3)
    titled = [ax.get_title() for ax in fig.axes if ax.images]
    assert titled == list("abcde") and len(fig.axes) == 6
    with pytest.raises(ValueError, match="one title per image"):
        plotting.show_images(torch.rand(2, 3, 8, 8), titles=["a"])
    fig2 = plotting.show_heatmaps(torch.rand(2, 3, 8, 8), torch.rand(2, 8, 8))
    assert sum(1 for ax in fig2.axes if ax.images) == 2
    fig3 = plotting.learning_curves({"loss": list(np.linspace(2, 0.1, 50)), "train_acc": [0.5] * 50,
                                     "val_step": [49], "val_acc": [0.9]})
    assert len(fig3.axes) == 2 and len(fig3.axes[0].lines) == 2
    fig4 = plotting.show_grid(torch.randn(6, 3, 5, 5))
    assert fig4.axes[0].images
    plt.close("all")


def test_signed_image_by_hand():
    g = torch.zeros(3, 2, 2)
    g[0, 0, 0], g[1, 1, 1] = 2.0, -1.0
    picture = plotting.signed_image(g)
    assert picture.shape == (2, 2, 3)
    assert picture[0, 0, 0] == 1.0  # the largest |g| at full brightness
    assert picture[1, 1, 1] == 0.25  # -1 of a scale 2: 0.5 - 1 / 4
    assert picture[0, 1, 2] == 0.5  # zero is grey
    common = plotting.signed_image(g, scale=4.0)  # a common scale keeps magnitudes comparable
    assert common[0, 0, 0] == 0.75
    assert np.all(plotting.signed_image(torch.zeros(3, 4, 4)) == 0.5)  # an all-zero map: grey, no NaN
    assert np.all(plotting.signed_image(g.numpy(), scale=0.5) <= 1)  # clipped beyond the scale
    with pytest.raises(ValueError, match=r"shape \(3, H, W\)"):
        plotting.signed_image(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="scale"):
        plotting.signed_image(g, scale=0)


def test_draw_box_covers_the_pixels_of_the_box():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.imshow(np.zeros((10, 10)))
    rect = plotting.draw_box(ax, (2, 3, 6, 5), color="red", ls="--")
    assert rect in ax.patches
    assert rect.get_xy() == (1.5, 2.5) and rect.get_width() == 4 and rect.get_height() == 2
    assert rect.get_linestyle() == "--" and not rect.get_fill()
    with pytest.raises(ValueError, match="x0 <= x1"):
        plotting.draw_box(ax, (5, 0, 2, 3))
    with pytest.raises(ValueError, match="expected a box"):
        plotting.draw_box(ax, (1, 2, 3))
    plt.close(fig)
