"""`psr import`: a folder of camera frames and a settings table -> a scan file (DESIGN.md, "Measured images").

Per screen, in this order: read (psr.data.images), orient (rotate, flip), count saturated pixels (raw
counts), subtract the mean dark frame, median filter, threshold, align (shots or settings), crop (one
region for all images of the screen), pool. Geometry after crop and pool goes into the lattice's Screen
entry and the screen's attributes; the config text and library versions go into /provenance.
"""

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from psr.data import preprocess as pp
from psr.data.checks import InputError, check_output_folder
from psr.data.images import read_frames
from psr.data.importer_config import Row, load_import_config, read_table
from psr.data.scanfile import ScanData, ScreenData, write_scan


class SaturationWarning(UserWarning):
    """Pixels at the camera's full scale (preprocess.saturation: warn)."""


@dataclass
class ImportResult:
    """What `import_scan` wrote: the scan file, and one line per screen saying what was done."""

    path: Path
    scan: ScanData
    notes: list[str] = field(default_factory=list)


def library_versions() -> dict[str, str]:
    """Versions of psr and of the libraries that read and processed the images."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("psr-beam", "numpy", "scipy", "scikit-image", "imageio", "tifffile", "pillow", "h5py", "pyyaml"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _screen_frames(name, rows: list[Row], screen: dict, pre: dict):
    """Read, orient and clean every file of one screen: a list of (row, frame (H, W)) in table order."""
    darks = None
    if screen["dark"]:
        stacks = [pp.orient(read_frames(path).frames, screen["rotate"], screen["flip"]) for path in screen["dark"]]
        for path, stack in zip(screen["dark"], stacks):
            if stack.shape[-2:] != stacks[0].shape[-2:]:
                raise InputError(f"screen {name}: dark frame {path} is {stack.shape[-2]}x{stack.shape[-1]}, "
                                 f"but {screen['dark'][0]} is {stacks[0].shape[-2]}x{stacks[0].shape[-1]} (H x W)")
        darks = np.concatenate(stacks)
    out, first = [], None
    for row in rows:
        frames = read_frames(row.path)
        if first is None:
            first = (row, frames.frames.shape[-2:])
        if frames.frames.shape[-2:] != first[1]:
            raise InputError(f"{row.where}: image {row.path} is {frames.frames.shape[-2]}x{frames.frames.shape[-1]} "
                             f"(H x W) but {first[0].path} on screen {name} is {first[1][0]}x{first[1][1]}")
        full_scale = screen["full_scale"] if screen["full_scale"] is not None else frames.full_scale
        saturated = pp.saturated_pixels(frames.frames, full_scale)
        if saturated.any():
            message = (f"{row.path}: {int(saturated.sum())} pixel(s) at the camera's full scale {full_scale:g} "
                       f"(saturated, screen {name})")
            if pre["saturation"] == "error":
                raise InputError(message + "; preprocess.saturation is error")
            warnings.warn(message, SaturationWarning, stacklevel=2)
        stack = pp.orient(frames.frames, screen["rotate"], screen["flip"])
        if darks is not None:
            if darks.shape[-2:] != stack.shape[-2:]:
                raise InputError(f"screen {name}: dark frames are {darks.shape[-2]}x{darks.shape[-1]} but {row.path} "
                                 f"is {stack.shape[-2]}x{stack.shape[-1]} (H x W, after rotation)")
            stack = pp.subtract_dark(stack, darks)
        for s, frame in enumerate(stack):
            frame = pp.apply_threshold(pp.median_filter(frame, pre["median"]), pre["threshold"])
            if not frame.sum() > 0:
                shot = f" (shot {s} of the stack)" if len(stack) > 1 else ""
                raise InputError(f"{row.where}: image {row.path}{shot} is empty after preprocessing "
                                 f"(median {pre['median']}, threshold {pre['threshold']})")
            out.append((row, frame))
    return out


def _arrange(frames, n_settings: int) -> np.ndarray:
    """(K, S, H, W) from (row, frame) pairs: shots of a setting ordered by the `shot` column, then table order;
    missing shots and settings are all-NaN images."""
    per_setting = [[] for _ in range(n_settings)]
    for row, frame in frames:
        per_setting[row.setting].append((row.shot, row.line, len(per_setting[row.setting]), frame))
    n_shots = max(len(shots) for shots in per_setting)
    height, width = frames[0][1].shape
    images = np.full((n_settings, n_shots, height, width), np.nan)
    for k, shots in enumerate(per_setting):
        order = sorted(shots, key=lambda item: (np.inf if item[0] is None else item[0], item[1], item[2]))
        for s, (*_, frame) in enumerate(order):
            images[k, s] = frame
    return images


def _align(images: np.ndarray, mode: str) -> np.ndarray:
    """Shots centred on their setting's mean centroid ("shots"), or every image on the screen's mean ("settings")."""
    if mode == "none":
        return images
    n_settings, n_shots, height, width = images.shape
    flat = images.reshape(-1, height, width)
    measured = ~np.isnan(flat).all(axis=(1, 2))
    centroids = np.full((flat.shape[0], 2), np.nan)
    centroids[measured] = [pp.centroid(image) for image in flat[measured]]
    centroids = centroids.reshape(n_settings, n_shots, 2)
    if mode == "shots":
        targets = np.broadcast_to(np.nanmean(centroids, axis=1, keepdims=True), centroids.shape)
    else:
        targets = np.broadcast_to(np.nanmean(centroids.reshape(-1, 2), axis=0), centroids.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # mean of an all-NaN setting
        return pp.align(flat, targets.reshape(-1, 2)).reshape(images.shape)


def _process_screen(name, rows, screen, pre, n_settings):
    """Images (K, S, H, W), pixel size, centre and a note for one screen."""
    frames = _screen_frames(name, rows, screen, pre)
    full_shape = frames[0][1].shape
    images = _align(_arrange(frames, n_settings), pre["align"])
    if pre["crop"] == "auto":
        region = pp.beam_region(images, pre["margin"])
    else:
        region = [int(v) for v in pre["crop"]]
        x0, x1, y0, y1 = region
        if not (0 <= x0 < x1 <= full_shape[1] and 0 <= y0 < y1 <= full_shape[0]):
            raise InputError(f"preprocess.crop {region} is not inside screen {name}'s frames of "
                             f"{full_shape[1]} columns x {full_shape[0]} rows (after rotation)")
    width, height = region[1] - region[0], region[3] - region[2]
    factor = pp.pool_factor(width, height, pre["pool"], pre["max_pixels"])
    if factor > min(width, height):
        raise InputError(f"screen {name}: pool factor {factor} is larger than the cropped region ({width} x {height} pixels)")
    region = pp.pool_region(region, factor)
    images = pp.pool(pp.crop(images, region), factor)
    raw_size = pp.oriented_pixel_size(screen["pixel_size"], screen["rotate"])
    pixel_size = (raw_size[0] * factor, raw_size[1] * factor)
    center = pp.region_center(region, full_shape, raw_size)
    for row, _ in frames:
        k_images = images[row.setting].reshape(-1, *images.shape[-2:])
        if any(not np.isnan(image).all() and not image.sum() > 0 for image in k_images):
            raise InputError(f"{row.where}: image {row.path} is empty after cropping to {region} (screen {name})")
    if images.shape[1] == 1:
        images = images[:, 0]
    note = (f"screen {name}: {len(frames)} image(s) of {full_shape[1]}x{full_shape[0]} pixels; crop [x0, x1, y0, y1] = "
            f"{region}, pool {factor} -> {images.shape[-1]}x{images.shape[-2]} pixels (W x H) of "
            f"{pixel_size[0] * 1e6:.4g} x {pixel_size[1] * 1e6:.4g} um, centre ({center[0] * 1e3:.4g}, "
            f"{center[1] * 1e3:.4g}) mm; images {tuple(images.shape)}; align {pre['align']}")
    if pre["align"] == "settings":
        note += " (every image centred: the fit must ignore centroids)"
    return ScreenData(images=images, pixel_size=pixel_size, center=center,
                      aligned=None if pre["align"] == "none" else pre["align"]), region, note


def import_scan(config_path, output=None) -> ImportResult:
    """Run `psr import` for the config file at config_path; output overrides its `output` key. Raises
    InputError (one line naming the file or row) before anything is written."""
    config = load_import_config(config_path)
    table = read_table(config)
    output = Path(output) if output is not None else config["output"]
    check_output_folder(output.parent, "output folder")
    pre = config["preprocess"]
    screens, notes = {}, []
    for name, screen in config["screens"].items():
        rows = [row for row in table.rows if row.screen == name]
        if not rows:
            raise InputError(f"{config['table']}: no row images screen {name} (named in screens)")
        screens[name], region, note = _process_screen(name, rows, screen, pre, len(table.settings))
        notes.append(note)
    lattice = [dict(item) for item in config["lattice_items"]]
    for item in lattice:
        if item.get("type") == "Screen" and item.get("name") in screens:
            data = screens[item["name"]]
            item.update(resolution=[int(data.images.shape[-1]), int(data.images.shape[-2])],
                        pixel_size=[float(v) for v in data.pixel_size], center=[float(v) for v in data.center])
    provenance = {"import_yaml": config["text"], "versions": json.dumps(library_versions()),
                  "import_notes": "\n".join(notes)}
    scan = ScanData(lattice=lattice, settings=table.settings, setting_names=table.names, screens=screens,
                    p0c=config["p0c"], species=config["species"], charge=config["charge"], provenance=provenance)
    write_scan(output, scan)
    return ImportResult(path=output, scan=scan, notes=notes)

