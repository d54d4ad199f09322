"""Fitting images that `psr import` centred (align: settings): the fit ignores the images' centroids.

A screen whose images were all moved onto one centroid at import (ScreenData.aligned == "settings") no
longer says where the beam was; its predicted images are shifted onto the measured images' centroids
before the mismatch is taken, so only the beam's shape (not its position) is fitted there. The shift is
bilinear and differentiable in both the image and its centroid.
"""

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_only


def centred_screens(scan) -> set[str]:
    """Screens of a scan file (`ScanData`) whose images were centred at import (align: settings); says so
    once (rank 0)."""
    names = {name for name, screen in scan.screens.items() if getattr(screen, "aligned", None) == "settings"}
    if names and rank_zero_only.rank == 0:
        print(f"screen(s) {', '.join(sorted(names))}: images centred at import (align: settings): the fit ignores "
              "their centroids (predicted images are shifted onto the measured centroids)")
    return names


def image_centroids(images: torch.Tensor) -> torch.Tensor:
    """(B, 2) intensity-weighted centre (row, column) [pixels] of non-negative images (B, H, W)."""
    height, width = images.shape[-2:]
    total = images.sum(dim=(-1, -2)).clamp_min(1e-30)  # an empty image (beam off the screen): centroid 0
    rows = torch.arange(height, dtype=images.dtype, device=images.device)
    cols = torch.arange(width, dtype=images.dtype, device=images.device)
    return torch.stack([(images.sum(dim=-1) @ rows) / total, (images.sum(dim=-2) @ cols) / total], dim=-1)


def shift_images(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Images (B, H, W) moved by shifts (B, 2) (rows, columns) [pixels], bilinear, zero outside the frame:
    a whole-pixel shift is exact; differentiable in the images and the shifts."""
    batch, height, width = images.shape
    rows = torch.arange(height, dtype=images.dtype, device=images.device)
    cols = torch.arange(width, dtype=images.dtype, device=images.device)
    # output pixel (i, j) reads the input at (i - shift_row, j - shift_col), in grid_sample's [-1, 1] coordinates
    y = 2 * (rows[None, :] - shifts[:, :1]) / max(height - 1, 1) - 1
    x = 2 * (cols[None, :] - shifts[:, 1:]) / max(width - 1, 1) - 1
    grid = torch.stack([x[:, None, :].expand(batch, height, width), y[:, :, None].expand(batch, height, width)], dim=-1)
    return F.grid_sample(images[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[:, 0]


def centre_on(predicted: torch.Tensor, measured: torch.Tensor) -> torch.Tensor:
    """Predicted images (B, H, W) shifted so their centroids sit on those of the measured images (B, H, W)."""
    if predicted.shape[0] == 0:
        return predicted
    shifts = image_centroids(measured.to(predicted.dtype)) - image_centroids(predicted)
    return shift_images(predicted, shifts)
