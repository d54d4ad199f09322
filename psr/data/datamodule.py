"""LightningDataModule over a scan data file: settings and normalized images, split train/validation."""

import warnings

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from psr.data.scanfile import ScanData, read_scan


EDGE_WARNING = 0.01  # fraction of an image's intensity in its outer frame above which we warn


def prepare_images(screen, name: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Measured images (K, H, W) ready to fit and a (K,) flag of settings where the screen was measured.

    Shots are averaged, the background is subtracted (clipped at 0), the mask applied, and each
    image normalized to unit sum. Unmeasured (all-NaN) images become zeros with flag False.
    """
    images = np.asarray(screen.images, dtype=np.float64)
    if images.ndim == 4:  # average the shots that were taken (an all-NaN shot was not)
        taken = ~np.isnan(images).all(axis=(-1, -2), keepdims=True)
        count = taken.sum(axis=1)
        images = np.where(count > 0, np.where(taken, np.nan_to_num(images), 0.0).sum(axis=1) / np.maximum(count, 1), np.nan)
    measured = ~np.isnan(images).all(axis=(-1, -2))
    images = np.nan_to_num(images, nan=0.0)
    if screen.background is not None:
        images = np.clip(images - screen.background, 0.0, None)
    if screen.mask is not None:
        images = images * screen.mask
    total = images.sum(axis=(-1, -2), keepdims=True)
    if (total[measured] <= 0).any():
        empty = np.flatnonzero(measured & (total.reshape(-1) <= 0)).tolist()
        raise ValueError(f"screen {name}: the measured image(s) of setting(s) {empty} are empty (they sum to zero "
                         "after background and mask)")
    images = np.where(total > 0, images / np.where(total > 0, total, 1.0), 0.0)
    edge = images.copy()
    edge[..., 2:-2, 2:-2] = 0.0
    clipped = np.flatnonzero(edge.sum(axis=(-1, -2)) > EDGE_WARNING)
    if clipped.size:
        warnings.warn(
            f"screen {name}: more than {EDGE_WARNING:.0%} of the intensity lies in the outer two pixels of "
            f"image(s) {clipped.tolist()}: the beam may extend past the screen, and the fit cannot see that part "
            "(rms emittances come out low)", stacklevel=2)
    return images.astype(np.float32), measured


def upstream_groups(scan) -> np.ndarray:
    """(K,) index of each setting's distinct upstream setting, numbered in order of first appearance
    (each setting its own group in a file without upstream settings)."""
    upstream = list(getattr(scan, "upstream", None) or [])
    if not upstream:
        return np.arange(scan.settings.shape[0])
    values = scan.settings[:, [list(scan.setting_names).index(n) for n in upstream]]
    _, first, inverse = np.unique(values, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))  # rank of each distinct value by first appearance
    return order[inverse.reshape(-1)]


class _RepeatedFullBatch(IterableDataset):
    """Yields the same full batch `repeats` times (one optimizer step each). Iterable, so that Lightning
    gives every process of a distributed fit all `repeats` of it (each process takes its share of the
    batch's settings) instead of splitting the repeats between processes with a DistributedSampler."""

    def __init__(self, batch: dict, repeats: int):
        self.batch, self.repeats = batch, repeats

    def __len__(self):
        return self.repeats

    def __iter__(self):
        return (self.batch for _ in range(self.repeats))


class ScanDataModule(L.LightningDataModule):
    """Serves a scan file's settings and images.

    path: the scan file (HDF5, contract v1). val_every: every n-th setting (starting with the
    second) is held out for validation; 0 trains on all settings. In a file with upstream settings
    (DESIGN.md "Conditional beams") it counts distinct upstream settings instead, in the order they
    first appear: every n-th is held out with all its images, so validation measures the beam at
    upstream settings the model never saw. steps_per_epoch: optimizer steps
    per epoch, each on all training settings at once (a whole scan is one batch).
    """

    def __init__(self, path: str, val_every: int = 2, steps_per_epoch: int = 50):
        super().__init__()
        if val_every < 0 or val_every == 1:
            raise ValueError(f"val_every must be 0 (no validation) or >= 2, got {val_every}")
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.path, self.val_every, self.steps_per_epoch = path, val_every, steps_per_epoch
        self.scan: ScanData | None = None

    def setup(self, stage: str | None = None):
        if self.scan is None:
            self.load(read_scan(self.path))

    def load(self, scan: ScanData) -> None:
        """Serve `scan` (read from `path`, e.g. by the command's checks): split it and prepare its images
        (a measured image that is empty raises a ValueError naming the file, screen and settings)."""
        n_settings = scan.settings.shape[0]
        index = np.arange(n_settings)
        groups = upstream_groups(scan)
        if self.val_every:
            val = index[groups % self.val_every == 1]
        else:
            val = index[:0]
        train = np.setdiff1d(index, val)
        try:
            prepared = {name: prepare_images(screen, name) for name, screen in scan.screens.items()}
        except ValueError as err:
            raise ValueError(f"{self.path}: {err}") from None
        self.scan, self.train_index, self.val_index = scan, train, val
        self.images = {name: torch.from_numpy(img) for name, (img, _) in prepared.items()}
        self.measured = {name: torch.from_numpy(flag) for name, (_, flag) in prepared.items()}
        self.settings = torch.from_numpy(scan.settings.astype(np.float32))

    def batch(self, index) -> dict:
        """The batch of the given setting indices: settings (B, P), images and measured flags by screen."""
        index = torch.as_tensor(index, dtype=torch.long)
        return {
            "index": index,
            "settings": self.settings[index],
            "images": {name: img[index] for name, img in self.images.items()},
            "measured": {name: flag[index] for name, flag in self.measured.items()},
        }

    def train_dataloader(self):
        return DataLoader(_RepeatedFullBatch(self.batch(self.train_index), self.steps_per_epoch), batch_size=None)

    def val_dataloader(self):
        if len(self.val_index) == 0:
            return []
        return DataLoader(_RepeatedFullBatch(self.batch(self.val_index), 1), batch_size=None)
