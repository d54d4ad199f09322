"""`psr render-camera`: a scan file's clean images as the raw frames of a real camera, to test `psr import`.

Each clean image (a `psr simulate` scan: unit-sum images of the true beam) is resampled, intensity
conserving, onto the pixels of a camera whose optical axis is the beam axis (x = y = 0), moved by a
shot's centroid jitter and a setting's drift, scaled to counts, and given the camera's flaws: a pedestal
with a fixed pattern, shot (Poisson) noise, read noise, hot pixels, a few saturated frames (clipped at
full scale); then turned into the camera's own orientation (the inverse of `psr import`'s rotate and
flip) and written as 16-bit PNG or TIFF, with dark frames, a settings table, the lattice and an
`<name>.import.yaml`, so that `psr import --config <name>.import.yaml` makes a scan file of it.
"""

import csv
from pathlib import Path

import numpy as np
import yaml

import sim
from psr.data.preprocess import FLIPS, ROTATIONS, oriented_pixel_size
from psr.data.scanfile import read_scan

FULL_SCALE = 65535  # a 16-bit camera
PREPROCESS = {"median": 3, "threshold": "noise", "crop": "auto", "margin": 0.15, "pool": "auto",
              "max_pixels": 200, "saturation": "warn", "align": "shots"}


def overlap_matrix(edges_out: np.ndarray, edges_in: np.ndarray) -> np.ndarray:
    """(n_out, n_in): the fraction of input bin j (edges_in, n_in + 1 increasing) that lies in output bin i
    (edges_out, n_out + 1): resampling a piecewise-constant density with it conserves what lies inside."""
    lo = np.maximum(edges_out[:-1, None], edges_in[None, :-1])
    hi = np.minimum(edges_out[1:, None], edges_in[None, 1:])
    return np.clip(hi - lo, 0.0, None) / np.diff(edges_in)[None, :]


def _edges(n: int, size: float, centre: float) -> np.ndarray:
    """Pixel edges (n + 1,) [m] of n pixels of `size` centred on `centre` (the sim.Screen convention)."""
    return centre + (np.arange(n + 1) - n / 2) * size


def to_camera(view: np.ndarray, rotate: int, flip: str) -> np.ndarray:
    """The camera's raw frame from a view in the scan orientation: the inverse of `preprocess.orient`."""
    out = view[..., ::-1] if flip == "x" else view[..., ::-1, :] if flip == "y" else view
    return np.ascontiguousarray(np.rot90(out, -(rotate // 90), axes=(-2, -1)))


def render_view(image: np.ndarray, screen: "sim.Screen", shape, pixel, offset=(0.0, 0.0)) -> np.ndarray:
    """A clean image (H, W) of `screen` on the oriented camera frame `shape` (H', W') with pixels `pixel`
    (dx, dy) [m] centred on the beam axis, the beam moved by offset (x, y) [m]; intensity conserving."""
    width, height = screen.resolution
    (dx, dy), (cx, cy) = screen.pixel_size.tolist(), screen.center.tolist()
    rows = overlap_matrix(_edges(shape[0], pixel[1], 0.0), _edges(height, dy, cy + offset[1]))
    cols = overlap_matrix(_edges(shape[1], pixel[0], 0.0), _edges(width, dx, cx + offset[0]))
    return rows @ image @ cols.T


def render_camera(
    scan: str,
    output: str,
    name: str = "camera",
    resolution: tuple[int, int] = (1280, 960),
    pixel_size: tuple[float, float] | None = None,
    rotate: int = 90,
    flip: str = "none",
    peak_counts: float = 50000.0, gain: float = 1.0,
    pedestal: float = 100.0, pedestal_pattern: float = 5.0, read_noise: float = 5.0,
    hot_pixels: int = 20, saturated_frames: int = 2, saturation: float = 1.5,
    shots: int = 3, jitter: float = 0.0, drift: float = 0.0, darks: int = 5,
    image_format: str = "png",
    seed: int = 0,
    preprocess: dict | None = None,
) -> Path:
    """Write the raw camera frames of every image of `scan` and an import config; returns the config's path.

    Args:
        scan: a scan file with clean images (e.g. from `psr simulate`); every screen gets the same camera.
        output: folder to write into (created): <name>.import.yaml, <name>.lattice.yaml, settings.csv,
            frames/<screen>_k<setting>_s<shot>.<format>, frames/<screen>_dark<d>.<format>.
        resolution: (W, H) raw camera pixels (columns, rows).
        pixel_size: (along columns, along rows) [m] per raw pixel; None: the clean screen's field of view
            fills the camera's (oriented) frame.
        rotate, flip: how the camera is mounted, in `psr import`'s convention (the import undoes it).
        peak_counts: mean signal [counts] at the brightest pixel of the brightest setting.
        gain: counts per photoelectron (shot noise: counts = gain * Poisson(signal / gain)).
        pedestal: mean dark level [counts]; pedestal_pattern: rms [counts] of its fixed pixel pattern.
        read_noise: rms [counts] per pixel and frame.
        hot_pixels: per frame, that many random pixels at 20-50 % of full scale (not in the dark frames).
        saturated_frames: the frames with the highest peaks (the brightest setting's shots), that many, get
            `saturation` times their signal (a brighter shot) and are clipped at the full scale (65535): with
            peak_counts 50000 and saturation 1.5, the top 13 % of their peak is cut.
        shots: frames per setting; jitter: rms [m] of each shot's centroid offset in x and y; drift: rms
            [m] of each setting's offset in x and y (all shots of it).
        darks: dark frames per screen (pedestal, pattern and read noise only).
        image_format: png or tiff (16 bit).
        seed: random seed of every noise.
        preprocess: the import config's preprocess section (defaults: median 3, threshold noise, auto
            crop and pool, align shots).
    """
    if rotate not in ROTATIONS or flip not in FLIPS:
        raise ValueError(f"rotate must be one of {ROTATIONS} and flip one of {FLIPS}, got {rotate!r}, {flip!r}")
    if image_format not in ("png", "tiff"):
        raise ValueError(f"image_format must be png or tiff, got {image_format!r}")
    if shots < 1 or darks < 0 or hot_pixels < 0 or saturated_frames < 0 or min(resolution) < 1:
        raise ValueError("shots must be >= 1; darks, hot_pixels, saturated_frames >= 0; resolution positive")
    if not (peak_counts > 0 and gain > 0 and saturation > 0):
        raise ValueError("peak_counts, gain and saturation must be positive")
    data = read_scan(scan)
    lattice = sim.Lattice.from_list(data.lattice)
    rng = np.random.default_rng(seed)
    folder = Path(output)
    (folder / "frames").mkdir(parents=True, exist_ok=True)
    raw_shape = (int(resolution[1]), int(resolution[0]))  # (H, W) of the camera's own frame
    shape = raw_shape[::-1] if rotate in (90, 270) else raw_shape  # (H, W) in the scan orientation
    n_settings = data.settings.shape[0]
    drifts = drift * rng.standard_normal((n_settings, 2))
    rows, screens = [], {}
    for screen_name, screen_data in data.screens.items():
        screen = lattice.screens[screen_name]
        if pixel_size is None:
            (dx, dy), (width, height) = screen.pixel_size.tolist(), screen.resolution
            size = max(width * dx / shape[1], height * dy / shape[0])
            raw_pixel = (size, size)
        else:
            raw_pixel = tuple(float(v) for v in pixel_size)
        pixel = oriented_pixel_size(raw_pixel, rotate)
        images = np.asarray(screen_data.images, dtype=np.float64)
        images = images if images.ndim == 3 else np.nanmean(images, axis=1)
        measured = [k for k in range(n_settings) if not np.isnan(images[k]).all()]
        views = {(k, s): render_view(images[k], screen, shape, pixel, drifts[k] + jitter * rng.standard_normal(2))
                 for k in measured for s in range(shots)}
        scale = peak_counts / max(view.max() for view in views.values())
        chosen = sorted(views, key=lambda frame: -views[frame].max())[:saturated_frames]
        boost = {frame: saturation for frame in chosen}
        dark_level = pedestal + pedestal_pattern * rng.standard_normal(raw_shape)

        def noisy(signal):
            counts = dark_level + read_noise * rng.standard_normal(raw_shape)
            if signal is not None:
                counts = counts + gain * rng.poisson(np.clip(signal, 0.0, None) / gain)
                where = rng.integers(0, raw_shape[0] * raw_shape[1], size=hot_pixels)
                counts.flat[where] = rng.uniform(0.2, 0.5, size=hot_pixels) * FULL_SCALE
            return np.clip(np.rint(counts), 0, FULL_SCALE).astype(np.uint16)

        for (k, s), view in views.items():
            file = f"frames/{screen_name}_k{k:03d}_s{s}.{image_format}"
            signal = to_camera(view, rotate, flip) * scale * boost.get((k, s), 1.0)
            _write(folder / file, noisy(signal))
            rows.append({"file": file, "screen": screen_name, "shot": s,
                         **{n: repr(float(v)) for n, v in zip(data.setting_names, data.settings[k])}})
        dark_files = [f"frames/{screen_name}_dark{d}.{image_format}" for d in range(darks)]
        for file in dark_files:
            _write(folder / file, noisy(None))
        screens[screen_name] = {"pixel_size": list(raw_pixel), "rotate": rotate, "flip": flip,
                                **({"dark": dark_files} if dark_files else {})}
    with open(folder / "settings.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (folder / f"{name}.lattice.yaml").write_text(data.lattice_yaml)
    config = {"output": f"{name}.h5", "lattice": f"{name}.lattice.yaml", "p0c": float(data.p0c),
              "species": data.species, "charge": float(data.charge), "table": "settings.csv", "screens": screens,
              "preprocess": {**PREPROCESS, **(preprocess or {})}}
    path = folder / f"{name}.import.yaml"
    header = (f"# psr import --config {path.name}: raw frames rendered by psr render-camera from {scan}\n"
              f"# camera {resolution[0]}x{resolution[1]}, rotate {rotate}, flip {flip}, {shots} shot(s), jitter {jitter:g} m, "
              f"drift {drift:g} m, {len(chosen)} saturated frame(s), {darks} dark frame(s)\n")
    path.write_text(header + yaml.safe_dump(config, sort_keys=False))
    return path


def _write(path: Path, frame: np.ndarray) -> None:
    if path.suffix == ".png":
        import imageio.v3 as iio

        iio.imwrite(path, frame)
    else:
        import tifffile

        tifffile.imwrite(path, frame, photometric="minisblack")


def render_camera_cli(args: list[str]) -> None:
    """`psr render-camera --config <file>.yaml` (or --scan ... --output ... and any other argument)."""
    from jsonargparse import CLI

    path = CLI(render_camera, args=args, prog="psr render-camera", as_positional=False)
    print(f"wrote {path}: psr import --config {path}")

