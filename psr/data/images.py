"""Camera frames from files: PNG and TIFF (8 and 16 bit), NPY (2D, or 3D stacks of shots).

PNG is decoded by imageio (Pillow plugin), TIFF by tifffile, NPY by numpy: no hand-written decoders.
Every reader returns `Frames`: a float64 stack (S, H, W) in the file's own orientation (row 0 first)
and the camera's full scale (the value of a saturated pixel), used to detect saturation.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from psr.data.checks import InputError

PNG_SUFFIXES = (".png",)
TIFF_SUFFIXES = (".tif", ".tiff")
NPY_SUFFIXES = (".npy",)
SUFFIXES = PNG_SUFFIXES + TIFF_SUFFIXES + NPY_SUFFIXES


@dataclass
class Frames:
    """frames (S, H, W) float64 [camera counts]; full_scale: the count of a saturated pixel
    (255 for 8-bit, 65535 for 16-bit, the integer dtype's maximum), None for float data."""

    frames: np.ndarray
    full_scale: float | None
    dtype: str


def full_scale_of(dtype) -> float | None:
    """The largest value an integer dtype holds (a camera at full scale), None for floats."""
    dtype = np.dtype(dtype)
    return float(np.iinfo(dtype).max) if dtype.kind in "ui" else None


def _decode(path: Path) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix in PNG_SUFFIXES:
        import imageio.v3 as iio

        return np.asarray(iio.imread(path, plugin="pillow"))
    if suffix in TIFF_SUFFIXES:
        import tifffile

        return np.asarray(tifffile.imread(path))
    return np.load(path, allow_pickle=False)


def read_frames(path) -> Frames:
    """Read one image file into a stack of frames (S, H, W): a 2D image is one shot, a 3D NPY array or a
    multi-page TIFF is S shots. Raises InputError naming the file when it is missing or not a grayscale
    image."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such image file" if not path.exists() else f"{path}: is a folder, not an image")
    if path.suffix.lower() not in SUFFIXES:
        raise InputError(f"{path}: not an image file (psr import reads {', '.join(SUFFIXES)})")
    try:
        array = _decode(path)
    except Exception as err:  # the libraries raise many kinds for a broken or foreign file
        raise InputError(f"{path}: not a readable image ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    if array.dtype.kind not in "uif" or array.dtype == np.bool_:
        raise InputError(f"{path}: pixels must be numbers, got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[-1] in (3, 4) and path.suffix.lower() in PNG_SUFFIXES + TIFF_SUFFIXES:
        raise InputError(f"{path}: a colour image ({array.shape[-1]} channels); psr import reads grayscale camera frames")
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or min(array.shape) < 1:
        raise InputError(f"{path}: expected a 2D image or a 3D stack of shots (S, H, W), got shape {array.shape}")
    frames = array.astype(np.float64)
    if not np.isfinite(frames).all():
        raise InputError(f"{path}: contains NaN or infinite pixels")
    return Frames(frames=frames, full_scale=full_scale_of(array.dtype), dtype=str(array.dtype))
