"""Image preprocessing for `psr import`, one small function per step.

Images are numpy arrays (..., H, W) in camera counts. After `orient` they follow the scan-file
contract: row index grows with +y, column index with +x. Regions are [x0, x1, y0, y1] in pixels of
the oriented frame: columns x0 <= j < x1, rows y0 <= i < y1 (Python slices).
"""

import math

import numpy as np

ROTATIONS = (0, 90, 180, 270)
FLIPS = ("none", "x", "y")


def orient(frames: np.ndarray, rotate: int = 0, flip: str = "none") -> np.ndarray:
    """The frame(s) (..., H, W) in the contract orientation: numpy.rot90(frame, rotate // 90) (counter-clockwise
    as displayed with row 0 on top), then flip "x" reverses columns, "y" reverses rows."""
    if rotate not in ROTATIONS:
        raise ValueError(f"rotate must be one of {ROTATIONS} (degrees), got {rotate!r}")
    if flip not in FLIPS:
        raise ValueError(f"flip must be one of {FLIPS}, got {flip!r}")
    out = np.rot90(frames, rotate // 90, axes=(-2, -1))
    if flip == "x":
        out = out[..., ::-1]
    elif flip == "y":
        out = out[..., ::-1, :]
    return np.ascontiguousarray(out)


def oriented_pixel_size(pixel_size, rotate: int) -> tuple[float, float]:
    """(dx, dy) [m] of the oriented frame from the camera's (along its columns, along its rows): a rotation
    by 90 or 270 degrees exchanges them."""
    dx, dy = (float(v) for v in pixel_size)
    return (dy, dx) if rotate in (90, 270) else (dx, dy)


def subtract_dark(frames: np.ndarray, darks: np.ndarray) -> np.ndarray:
    """Frames (..., H, W) minus the mean of the dark frames darks (D, H, W) [counts]; may go negative
    (the threshold, or the final clip at zero, removes that)."""
    return frames - darks.mean(axis=0)


def median_filter(image: np.ndarray, size: int) -> np.ndarray:
    """Median over size x size pixels (removes hot pixels narrower than size / 2); size 0 or 1 = off."""
    if size in (0, 1):
        return image
    from scipy import ndimage

    return ndimage.median_filter(image, size=int(size), mode="nearest")


def threshold_value(image: np.ndarray, method) -> float:
    """Background level [counts] of one image: "triangle" or "otsu" (skimage.filters), or a number f in
    (0, 1): f times the image maximum. 0 = off (returns -inf)."""
    if isinstance(method, (int, float)) and not isinstance(method, bool):
        if method == 0:
            return -math.inf
        if not 0 < method < 1:
            raise ValueError(f"threshold must be triangle, otsu, a fraction in (0, 1) or 0, got {method!r}")
        return float(method) * float(image.max())
    if image.max() == image.min():
        return float(image.max())
    from skimage import filters

    if method == "triangle":
        return float(filters.threshold_triangle(image))
    if method == "otsu":
        return float(filters.threshold_otsu(image))
    raise ValueError(f"threshold must be triangle, otsu, a fraction in (0, 1) or 0, got {method!r}")


NOISE_BOX, NOISE_SIGMAS = 16, 3.0


def noise_mask(image: np.ndarray, box: int = NOISE_BOX, sigmas: float = NOISE_SIGMAS) -> np.ndarray:
    """Where the beam is in a dark-subtracted image (background 0 on average): the pixels whose mean over
    a box x box neighbourhood exceeds `sigmas` times that mean's noise, estimated from its negative side
    (only noise goes below 0, and for zero-mean noise the rms of the negative values is the noise rms)."""
    from scipy import ndimage

    smooth = ndimage.uniform_filter(np.asarray(image, dtype=np.float64), size=box, mode="constant")
    negative = smooth[smooth < 0]
    noise = float(np.sqrt(np.mean(negative**2))) if negative.size else 0.0
    return smooth > sigmas * noise


def apply_threshold(image: np.ndarray, method) -> np.ndarray:
    """The image minus its threshold (`threshold_value`), clipped at zero: pixels at or below the
    background become 0, and a pedestal under the beam is removed with it. Off (0): clipped at zero only.
    "noise" (for dark-subtracted frames): pixels outside `noise_mask` become 0, those inside keep their
    value (clipped at zero), so the beam's faint tails are not cut by a level subtracted everywhere."""
    if method == "noise":
        return np.clip(np.where(noise_mask(image), image, 0.0), 0.0, None)
    level = threshold_value(image, method)
    return np.clip(image - level, 0.0, None) if np.isfinite(level) else np.clip(image, 0.0, None)


def saturated_pixels(frames: np.ndarray, full_scale: float | None) -> np.ndarray:
    """Number of pixels at (or above) the camera's full scale [counts] in each frame of (..., H, W)."""
    if full_scale is None:
        return np.zeros(frames.shape[:-2], dtype=int)
    return (frames >= full_scale).sum(axis=(-2, -1))


def _extent(profile: np.ndarray, tail: float) -> tuple[int, int]:
    """Smallest index range [lo, hi) of a non-negative profile holding all but `tail` of its sum on each side."""
    cumulative = np.cumsum(profile) / profile.sum()
    lo = int(np.searchsorted(cumulative, tail, side="right"))
    hi = int(np.searchsorted(cumulative, 1.0 - tail, side="left")) + 1
    return lo, min(hi, profile.size)


def beam_region(images: np.ndarray, margin: float = 0.15, tail: float = 1e-4) -> list[int]:
    """One region [x0, x1, y0, y1] around the beam in every image of (..., H, W) (NaN images skipped):
    the union of each image's extent holding all but `tail` of its intensity on each side (tiny specks
    do not widen it), grown by `margin` times its width (height) on each side, within the frame."""
    height, width = images.shape[-2:]
    flat = images.reshape(-1, height, width)
    x0 = y0 = math.inf
    x1 = y1 = -math.inf
    for image in flat:
        if np.isnan(image).all() or image.sum() <= 0:
            continue
        lo, hi = _extent(image.sum(axis=0), tail)
        x0, x1 = min(x0, lo), max(x1, hi)
        lo, hi = _extent(image.sum(axis=1), tail)
        y0, y1 = min(y0, lo), max(y1, hi)
    if not math.isfinite(x0):
        raise ValueError("no image holds any intensity, so there is no beam to crop around")
    grow_x, grow_y = math.ceil(margin * (x1 - x0)), math.ceil(margin * (y1 - y0))
    return [max(0, x0 - grow_x), min(width, x1 + grow_x), max(0, y0 - grow_y), min(height, y1 + grow_y)]


def crop(images: np.ndarray, region) -> np.ndarray:
    """images[..., y0:y1, x0:x1] for region [x0, x1, y0, y1]."""
    x0, x1, y0, y1 = region
    return images[..., y0:y1, x0:x1]


def pool_factor(width: int, height: int, pool, max_pixels: int = 200) -> int:
    """The pooling factor: `pool` itself when an integer >= 1, else ("auto") the smallest factor that
    leaves at most max_pixels per side."""
    if pool == "auto":
        return max(1, math.ceil(max(width, height) / int(max_pixels)))
    return int(pool)


def pool_region(region, factor: int) -> list[int]:
    """The region trimmed at its far ends to whole multiples of `factor` pixels (what `pool` keeps)."""
    x0, x1, y0, y1 = region
    return [x0, x0 + (x1 - x0) // factor * factor, y0, y0 + (y1 - y0) // factor * factor]


def pool(images: np.ndarray, factor: int) -> np.ndarray:
    """Sum of factor x factor blocks of (..., H, W) (the sum is conserved; pixel size grows by factor);
    rows and columns left over at the far ends are dropped (see pool_region)."""
    if factor == 1:
        return images
    height, width = images.shape[-2] // factor, images.shape[-1] // factor
    trimmed = images[..., : height * factor, : width * factor]
    return trimmed.reshape(*images.shape[:-2], height, factor, width, factor).sum(axis=(-3, -1))


def centroid(image: np.ndarray) -> tuple[float, float]:
    """Intensity-weighted centre (row, column) of an image (H, W) [pixels]."""
    total = image.sum()
    rows, cols = np.arange(image.shape[0]), np.arange(image.shape[1])
    return float(image.sum(axis=1) @ rows / total), float(image.sum(axis=0) @ cols / total)


def shift(image: np.ndarray, rows: float, cols: float) -> np.ndarray:
    """The image moved by (rows, cols) pixels, bilinear interpolation (a whole-pixel shift is exact; the
    centroid moves by exactly the shift while no intensity leaves the frame)."""
    from scipy import ndimage

    return ndimage.shift(image, (rows, cols), order=1, mode="constant", cval=0.0, prefilter=False)


def align(images: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Every image of (N, H, W) moved so its centroid sits at targets (N, 2) (row, column) [pixels]; NaN
    images are left as they are."""
    out = images.copy()
    for n, image in enumerate(images):
        if np.isnan(image).all():
            continue
        row, col = centroid(image)
        out[n] = shift(image, targets[n][0] - row, targets[n][1] - col)
    return out


def region_center(region, frame_shape, pixel_size) -> tuple[float, float]:
    """(cx, cy) [m]: centre of region [x0, x1, y0, y1] relative to the centre of the oriented camera frame
    (H, W), for pixel_size (dx, dy) [m] of the oriented frame."""
    x0, x1, y0, y1 = region
    height, width = frame_shape
    return ((x0 + x1 - 1) / 2 - (width - 1) / 2) * pixel_size[0], ((y0 + y1 - 1) / 2 - (height - 1) / 2) * pixel_size[1]
