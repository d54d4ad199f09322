"""HDF5 scan data files (contract v1): read, validate, write atomically."""

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import yaml

import sim

from .openpmd import read_openpmd, write_bunch

FORMAT, VERSION = "scan", 1


class ScanFileError(ValueError):
    """A scan file (or scan data) that breaks the contract; the message names the problem."""


@dataclass
class ScreenData:
    """Measured images of one screen: (K, H, W) or (K, S, H, W) with S shots per setting."""

    images: np.ndarray
    pixel_size: tuple[float, float]
    center: tuple[float, float] = (0.0, 0.0)
    background: np.ndarray | None = None
    mask: np.ndarray | None = None


@dataclass
class ScanData:
    """One measurement campaign: lattice entries, K settings of P parameters, screen images, reference."""

    lattice: list[dict]
    settings: np.ndarray
    setting_names: list[str]
    screens: dict[str, ScreenData]
    p0c: float
    species: str = "electron"
    charge: float = 0.0
    ground_truth: np.ndarray | None = field(default=None, repr=False)

    @property
    def lattice_yaml(self) -> str:
        return yaml.safe_dump(self.lattice, sort_keys=False)


def validate_scan(scan: ScanData, source: str = "scan") -> sim.Lattice:
    """Check everything the contract requires; returns the lattice. Raises ScanFileError."""
    def fail(message):
        raise ScanFileError(f"{source}: {message}")

    if not (np.isfinite(scan.p0c) and scan.p0c > 0):
        fail(f"p0c must be a positive momentum in eV, got {scan.p0c}")
    try:
        sim.get_species(scan.species)
    except ValueError as err:
        fail(str(err))
    if not (np.isfinite(scan.charge) and scan.charge >= 0):
        fail(f"charge is a magnitude in coulombs and must be >= 0, got {scan.charge}")
    try:
        lattice = sim.Lattice.from_list(scan.lattice)
    except (ValueError, TypeError, KeyError) as err:
        fail(f"lattice: {err}")
    settings = np.asarray(scan.settings)
    if settings.ndim != 2:
        fail(f"/settings must be 2-D (K settings, P parameters), got shape {settings.shape}")
    n_settings, n_params = settings.shape
    if n_settings < 1:
        fail("/settings holds no settings")
    if len(scan.setting_names) != n_params:
        fail(f"/settings has {n_params} columns but {len(scan.setting_names)} names {list(scan.setting_names)}")
    if not np.isfinite(settings).all():
        fail("/settings contains NaN or infinite values")
    try:
        lattice.split_settings({name: 0.0 for name in scan.setting_names})
    except (KeyError, ValueError) as err:
        fail(f"unknown setting name: {err.args[0]}")
    if len(set(scan.setting_names)) != len(scan.setting_names):
        fail(f"setting names repeat: {list(scan.setting_names)}")
    if not scan.screens:
        fail("/screens holds no screen")
    lattice_screens = lattice.screens
    for name, screen in scan.screens.items():
        where = f"/screens/{name}"
        if name not in lattice_screens:
            fail(f"{where}: the lattice has no Screen named {name!r} (its screens: {sorted(lattice_screens)})")
        element = lattice_screens[name]
        images = np.asarray(screen.images)
        if images.ndim not in (3, 4):
            fail(f"{where}/images must be (K, H, W) or (K, S, H, W), got shape {images.shape}")
        if images.shape[0] != n_settings:
            fail(f"{where}/images has {images.shape[0]} settings but /settings has {n_settings}")
        width, height = element.resolution
        if images.shape[-2:] != (height, width):
            fail(f"{where}/images are {images.shape[-2]}x{images.shape[-1]} (H x W) but the lattice screen "
                 f"{name} has resolution {width}x{height} (W x H)")
        per_setting = images.reshape(n_settings, -1)
        nan = np.isnan(per_setting)
        partial = nan.any(axis=1) & ~nan.all(axis=1)
        if partial.any():
            fail(f"{where}/images: NaN pixels inside measured image(s) at setting(s) {np.flatnonzero(partial).tolist()} "
                 "(only an entirely-NaN image may mark an unmeasured setting)")
        if np.isinf(per_setting).any():
            fail(f"{where}/images contain infinite pixels")
        if (per_setting[~nan] < 0).any():
            fail(f"{where}/images contain negative pixels (subtract backgrounds via the 'background' dataset)")
        if nan.all():
            fail(f"{where}/images: no setting was measured (all images are NaN)")
        for key, expected in (("pixel_size", element.pixel_size), ("center", element.center)):
            value = np.asarray(getattr(screen, key), dtype=np.float64)
            if value.shape != (2,) or not np.allclose(value, expected.numpy(), rtol=1e-9, atol=1e-15):
                fail(f"{where}: {key} {value.tolist()} disagrees with the lattice screen's {expected.tolist()}")
        for key in ("background", "mask"):
            extra = getattr(screen, key)
            if extra is not None:
                extra = np.asarray(extra)
                if extra.shape != (height, width):
                    fail(f"{where}/{key} must have shape {(height, width)}, got {extra.shape}")
                if not np.isfinite(extra).all():
                    fail(f"{where}/{key} contains NaN or infinite values")
    if scan.ground_truth is not None:
        truth = np.asarray(scan.ground_truth)
        if truth.ndim != 2 or truth.shape[1] != 6 or not np.isfinite(truth).all():
            fail(f"/ground_truth must be finite particles (N, 6), got shape {truth.shape}")
    return lattice


def _attr(node, key, source):
    if key not in node.attrs:
        raise ScanFileError(f"{source}: attribute {key!r} missing on {node.name}")
    value = node.attrs[key]
    return value.decode() if isinstance(value, bytes) else value


def _dataset(handle, path, source):
    if path not in handle or not isinstance(handle[path], h5py.Dataset):
        raise ScanFileError(f"{source}: {path} missing")
    return handle[path]


def read_scan(path) -> ScanData:
    """Read and validate a scan file."""
    source = str(path)
    if not Path(path).is_file():
        raise ScanFileError(f"{source}: no such file")
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise ScanFileError(f"{source}: not an HDF5 file ({err})") from None
    with handle:
        if _attr(handle, "psr_format", source) != FORMAT:
            raise ScanFileError(f"{source}: psr_format is {handle.attrs['psr_format']!r}, expected {FORMAT!r}")
        version = int(_attr(handle, "psr_version", source))
        if version != VERSION:
            raise ScanFileError(f"{source}: psr_version {version} is not supported (this psr reads version {VERSION})")
        if "lattice" not in handle:
            raise ScanFileError(f"{source}: /lattice missing")
        try:
            lattice_items = sim.lattice.load_lattice_text(str(_attr(handle["lattice"], "yaml", source)), f"{source}:/lattice")
        except ValueError as err:
            raise ScanFileError(str(err)) from None
        settings_node = _dataset(handle, "settings", source)
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in np.atleast_1d(_attr(settings_node, "names", source))]
        if "screens" not in handle:
            raise ScanFileError(f"{source}: /screens missing")
        screens = {}
        for name, group in handle["screens"].items():
            images = _dataset(handle, f"screens/{name}/images", source)[()]
            screens[name] = ScreenData(
                images=images,
                pixel_size=tuple(np.asarray(_attr(group, "pixel_size", source), dtype=float).ravel().tolist()),
                center=tuple(np.asarray(group.attrs.get("center", (0.0, 0.0)), dtype=float).ravel().tolist()),
                background=group["background"][()] if "background" in group else None,
                mask=group["mask"][()] if "mask" in group else None,
            )
        p0c = float(_attr(handle, "p0c", source))
        truth = None
        if "ground_truth" in handle:
            try:
                truth = read_openpmd(handle["ground_truth"], p0c=p0c).particles
            except ValueError as err:
                raise ScanFileError(f"{source}: /ground_truth: {err}") from None
        scan = ScanData(
            lattice=lattice_items, settings=np.asarray(settings_node[()], dtype=np.float64), setting_names=names,
            screens=screens, p0c=p0c, species=str(_attr(handle, "species", source)),
            charge=float(_attr(handle, "charge", source)), ground_truth=truth,
        )
    validate_scan(scan, source)
    return scan


def write_scan(path, scan: ScanData) -> Path:
    """Validate, then write a scan file atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    validate_scan(scan, str(path))
    fd, tmp = tempfile.mkstemp(suffix=".h5.tmp", dir=path.parent)
    os.close(fd)
    _umask = os.umask(0)
    os.umask(_umask)
    os.chmod(tmp, 0o666 & ~_umask)
    try:
        with h5py.File(tmp, "w") as handle:
            handle.attrs["psr_format"] = FORMAT
            handle.attrs["psr_version"] = VERSION
            handle.attrs["p0c"] = float(scan.p0c)
            handle.attrs["species"] = sim.get_species(scan.species).name
            handle.attrs["charge"] = float(scan.charge)
            handle.create_group("lattice").attrs["yaml"] = scan.lattice_yaml
            settings = handle.create_dataset("settings", data=np.asarray(scan.settings, dtype=np.float64))
            settings.attrs["names"] = np.array(list(scan.setting_names), dtype=h5py.string_dtype())
            for name, screen in scan.screens.items():
                group = handle.create_group(f"screens/{name}")
                group.create_dataset("images", data=np.asarray(screen.images, dtype=np.float32), compression="gzip")
                group.attrs["pixel_size"] = np.asarray(screen.pixel_size, dtype=np.float64)
                group.attrs["center"] = np.asarray(screen.center, dtype=np.float64)
                for key in ("background", "mask"):
                    if getattr(screen, key) is not None:
                        group.create_dataset(key, data=np.asarray(getattr(screen, key), dtype=np.float32))
            if scan.ground_truth is not None:
                write_bunch(handle.create_group("ground_truth"), scan.ground_truth, scan.p0c, scan.species, scan.charge)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
