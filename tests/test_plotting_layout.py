"""lecturekit.plotting layout checks: titles that overlap, legends over curves (issue 16)."""
import numpy as np

from lecturekit import plotting


def test_overlapping_titles_finds_a_second_row_running_into_the_first():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(3, 2.2))  # no layout engine: row 2's big titles hit row 1
    for ax in axes.flat:
        ax.imshow(np.zeros((4, 4)))
        ax.set_title("a long title\nover two lines", fontsize=14)
    found = plotting.overlapping_titles(fig)
    assert any("title" in f and "axes 0" in f for f in found), found
    plt.close(fig)
    fig, axes = plt.subplots(2, 2, figsize=(6, 5), layout="constrained")
    for ax in axes.flat:
        ax.imshow(np.zeros((4, 4)))
        ax.set_title("short", fontsize=9)
    fig.suptitle("a figure")
    assert plotting.overlapping_titles(fig) == []
    fig.suptitle("a suptitle set late, as mark_standin does", color="tab:red")
    assert plotting.overlapping_titles(fig) == []  # measured after the layout engine has placed it
    plt.close(fig)


def test_legend_covers_data_sees_segments_not_only_points():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    assert plotting.legend_covers_data(ax) == 0.0  # no legend
    ax.plot([0, 1], [1, 1], label="top line")  # two points at the corners, the segment across the top
    ax.set_ylim(0, 1.05)
    ax.legend(loc="upper center")
    assert plotting.legend_covers_data(ax) > 0  # the legend sits on the segment between the two points
    ax.legend(loc="lower center")
    assert plotting.legend_covers_data(ax) == 0.0
    plt.close(fig)
