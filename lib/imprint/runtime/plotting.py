"""The book's one plotting style, and small helpers that return figures (never show them)."""

from __future__ import annotations

import matplotlib

STYLE = {
    "figure.figsize": (6.4, 3.6),
    "figure.dpi": 110,
    "savefig.dpi": 150,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": "medium",
    "axes.labelsize": "medium",
    "legend.frameon": False,
    "legend.fontsize": "small",
    "image.cmap": "gray",
    "font.size": 10,
}


def use_style() -> None:
    """Apply the book's style to matplotlib's global settings."""
    matplotlib.rcParams.update(STYLE)


def image_grid(images, nrows: int, ncols: int, titles=None, scale: float = 1.0, cmap: str = "gray",
               vrange: tuple[float, float] | None = None):
    """A grid of images (a sequence of 2-D arrays, or HxWx3); returns the figure."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * scale, nrows * scale * (1.25 if titles else 1)),
                             squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if k >= len(images):
            continue
        img = np.asarray(images[k])
        kw = {} if vrange is None else {"vmin": vrange[0], "vmax": vrange[1]}
        ax.imshow(img, cmap=cmap if img.ndim == 2 else None, interpolation="nearest", **kw)
        if titles is not None:
            ax.set_title(str(titles[k]), fontsize=7)
    fig.tight_layout(pad=0.2)
    plt.close(fig)
    return fig
