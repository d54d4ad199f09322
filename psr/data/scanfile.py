"""HDF5 scan data files (contract v1, DESIGN.md): read, validate, write atomically.

Layout:
    /                        attrs psr_format = "scan", psr_version = 1, p0c [eV], species, charge [C]
    /lattice                 attr yaml: the lattice file text
    /settings                float64 (K, P), attr names: P strings "<element>.<parameter>"; optional attr
                             upstream: the names among them that are upstream machine settings (DESIGN.md
                             "Conditional beams"), not applied to the lattice but fed to a conditional beam
    /screens/<NAME>/images   float32 (K, H, W) or (K, S, H, W); attrs pixel_size (dx, dy), center (cx, cy) [m]
    /screens/<NAME>/background, mask   optional (H, W)
    /ground_truth            optional openPMD-beamphysics bunch: /ground_truth/<species>/...
    /ground_truth_upstream   optional (an extension of v1 for files with upstream settings, whose true beam
                             differs from one upstream setting to the next): datasets settings (G, U) [the
                             upstream values], emittances (G, E) with attr names (keys of psr's emittance
                             table) and particles (G, n, 6) float32 (a sample of each true beam)
"""

from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import yaml

import sim
from sim.lattice import load_lattice_text

from psr.data.atomic import atomic_target
from psr.data.lattices import build_lattice
from psr.data.openpmd import check_particles, read_openpmd, write_bunch

FORMAT, VERSION = "scan", 1


class ScanFileError(ValueError):
    """A scan file (or scan data) that breaks the contract; the message names the problem."""


@dataclass
class ScreenData:
    """Measured images of one screen: (K, H, W) or (K, S, H, W) with S shots per setting.

    An image that is entirely NaN marks a setting (or shot) where the screen was not measured.
    pixel_size (dx, dy) and center (cx, cy) [m] must agree with the lattice's Screen entry.
    background and mask: optional (H, W) arrays. aligned: optional attribute written by `psr import`
    ("shots": shots of a setting centred on their mean; "settings": every image centred, so the images'
    centroids carry no information and a fit must ignore them).
    """

    images: np.ndarray
    pixel_size: tuple[float, float]
    center: tuple[float, float] = (0.0, 0.0)
    background: np.ndarray | None = None
    mask: np.ndarray | None = None
    aligned: str | None = None


@dataclass
class ScanData:
    """One measurement campaign.

    lattice: lattice-file entries; settings (K, P) float64 with setting_names (P,) like "Q1.k1";
    screens: screen name -> ScreenData; p0c [eV], species, charge [C] (magnitude);
    ground_truth: optional true beam, (N, 6) Bmad particles.
    provenance: optional attributes of /provenance (strings), e.g. import_yaml: how the images were made.
    upstream: the setting names that are upstream machine settings (inputs of a conditional beam model;
    their elements are not in the lattice). upstream_truth: optional true beams at the upstream settings,
    {"settings": (G, U), "emittances": {key: (G,)}, "particles": (G, n, 6)} (/ground_truth_upstream).
    """

    lattice: list[dict]
    settings: np.ndarray
    setting_names: list[str]
    screens: dict[str, ScreenData]
    p0c: float
    species: str = "electron"
    charge: float = 0.0
    ground_truth: np.ndarray | None = field(default=None, repr=False)
    provenance: dict[str, str] | None = field(default=None, repr=False)
    folder: str | None = field(default=None, repr=False, compare=False)  # where the file is: neural weights are relative to it
    upstream: list[str] = field(default_factory=list)
    upstream_truth: dict | None = field(default=None, repr=False)

    @property
    def lattice_setting_names(self) -> list[str]:
        """The setting names applied to the lattice (all but the upstream ones)."""
        return [name for name in self.setting_names if name not in self.upstream]

    @property
    def lattice_yaml(self) -> str:
        """The lattice as lattice-file YAML text (what /lattice's yaml attribute holds)."""
        return yaml.safe_dump(_plain(self.lattice), sort_keys=False)


def _plain(value):
    """Lattice entries with tuples, numpy values and tensors turned into plain YAML-safe Python."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def _float(value, what: str, fail) -> float:
    try:
        array = np.asarray(value, dtype=np.float64)
        if array.size != 1:
            raise ValueError
        return float(array.reshape(-1)[0])
    except (TypeError, ValueError):
        fail(f"{what} must be a number, got {value!r}")


def validate_scan(scan: ScanData, source: str = "scan") -> sim.Lattice:
    """Check everything contract v1 requires of scan data; returns the built lattice.

    Raises ScanFileError with one message (prefixed by `source`) naming the first problem found.
    """
    def fail(message):
        raise ScanFileError(f"{source}: {message}")

    p0c = _float(scan.p0c, "p0c", fail)
    if not (np.isfinite(p0c) and p0c > 0):
        fail(f"p0c must be a positive momentum in eV, got {scan.p0c}")
    try:
        sim.get_species(scan.species)
    except ValueError as err:
        fail(str(err))
    charge = _float(scan.charge, "charge", fail)
    if not (np.isfinite(charge) and charge >= 0):
        fail(f"charge is a magnitude in coulombs and must be >= 0, got {scan.charge}")
    try:
        lattice = build_lattice(scan.lattice, scan.folder if scan.folder is not None else Path(source).parent)
    except (ValueError, TypeError, KeyError) as err:
        fail(f"/lattice is not a valid lattice: {err}")

    try:
        settings = np.asarray(scan.settings, dtype=np.float64)
    except (TypeError, ValueError):
        fail(f"/settings must be numbers, got {type(scan.settings).__name__}")
    if settings.ndim != 2:
        fail(f"/settings must be 2-D (K settings, P parameters), got shape {settings.shape}")
    n_settings, n_params = settings.shape
    if n_settings < 1:
        fail("/settings holds no settings (K = 0)")
    names = [str(n) for n in scan.setting_names]
    if len(names) != n_params:
        fail(f"/settings has {n_params} column(s) but {len(names)} name(s) {names}")
    if len(set(names)) != len(names):
        fail(f"/settings names repeat: {names}")
    upstream = [str(n) for n in (scan.upstream or [])]
    for name in upstream:
        if name not in names:
            fail(f"/settings attribute upstream names {name!r}, which is not a column of /settings {names}")
        element = name.rpartition(".")[0]
        if any(item.get("name") == element for item in scan.lattice):
            fail(f"/settings attribute upstream names {name!r}, but {element} is an element of the lattice: upstream "
                 "settings belong to machines before it (DESIGN.md, \"Conditional beams\")")
    try:
        lattice.split_settings({name: 0.0 for name in names if name not in upstream})
    except (KeyError, ValueError) as err:
        hint = " (an upstream machine setting must be listed in the /settings attribute upstream)"
        fail(f"unknown setting name: {err.args[0]}" + (hint if "no element named" in str(err.args[0]) else ""))
    if not np.isfinite(settings).all():
        rows = np.flatnonzero(~np.isfinite(settings).all(axis=1)).tolist()
        fail(f"/settings contains NaN or infinite values (setting(s) {rows})")

    if not scan.screens:
        fail("/screens holds no screen")
    lattice_screens = lattice.screens
    for name, screen in scan.screens.items():
        where = f"/screens/{name}"
        if name not in lattice_screens:
            try:
                kind = f" ({name} is a {type(lattice[name]).__name__})"
            except KeyError:
                kind = ""
            fail(f"{where}: the lattice has no Screen named {name!r}{kind}; its screens: {sorted(lattice_screens)}")
        element = lattice_screens[name]
        try:
            images = np.asarray(screen.images, dtype=np.float64)
        except (TypeError, ValueError):
            fail(f"{where}/images must be numbers")
        if images.ndim not in (3, 4):
            fail(f"{where}/images must be (K, H, W) or (K, S, H, W), got shape {images.shape}")
        if images.shape[0] != n_settings:
            fail(f"{where}/images has {images.shape[0]} setting(s) but /settings has {n_settings}")
        width, height = element.resolution
        if images.shape[-2:] != (height, width):
            fail(f"{where}/images are {images.shape[-2]}x{images.shape[-1]} (H x W) but the lattice's Screen "
                 f"{name} has resolution [{width}, {height}] (W, H), i.e. images {height}x{width}")
        flat = images.reshape(-1, height * width)  # one row per image (per setting, per shot)
        nan = np.isnan(flat)
        partial = nan.any(axis=1) & ~nan.all(axis=1)
        if partial.any():
            index = np.unravel_index(np.flatnonzero(partial), images.shape[:-2])
            where_bad = list(zip(*(i.tolist() for i in index))) if images.ndim == 4 else index[0].tolist()
            fail(f"{where}/images: NaN pixels inside measured image(s) at {'(setting, shot)' if images.ndim == 4 else 'setting'} "
                 f"{where_bad}; only an entirely-NaN image may mark an unmeasured setting")
        if nan.all():
            fail(f"{where}/images: no image was measured (all are NaN)")
        measured = flat[~nan.all(axis=1)]
        if np.isinf(measured).any():
            fail(f"{where}/images contain infinite pixels")
        if (measured < 0).any():
            fail(f"{where}/images contain negative pixels (min {measured.min():.3g}); images are intensities >= 0 "
                 "(store a background in the 'background' dataset instead of subtracting it)")
        for key, expected in (("pixel_size", element.pixel_size), ("center", element.center)):
            expected = expected.detach().cpu().numpy().astype(np.float64)
            try:
                value = np.asarray(getattr(screen, key), dtype=np.float64).reshape(-1)
            except (TypeError, ValueError):
                fail(f"{where}: {key} must be two numbers, got {getattr(screen, key)!r}")
            if value.shape != (2,) or not np.allclose(value, expected, rtol=1e-9, atol=1e-15):
                fail(f"{where}: {key} {value.tolist()} disagrees with the lattice's Screen {name} {key} {expected.tolist()}")
        for key in ("background", "mask"):
            extra = getattr(screen, key)
            if extra is None:
                continue
            try:
                extra = np.asarray(extra, dtype=np.float64)
            except (TypeError, ValueError):
                fail(f"{where}/{key} must be numbers")
            if extra.shape != (height, width):
                fail(f"{where}/{key} must have shape (H, W) = {(height, width)}, got {extra.shape}")
            if not np.isfinite(extra).all():
                fail(f"{where}/{key} contains NaN or infinite values")

    if scan.ground_truth is not None:
        try:
            check_particles(scan.ground_truth)
        except ValueError as err:
            fail(f"/ground_truth: {err}")
    if scan.upstream_truth is not None:
        truth_settings = np.asarray(scan.upstream_truth.get("settings"), dtype=np.float64)
        if not upstream or truth_settings.ndim != 2 or truth_settings.shape[1] != len(upstream):
            fail(f"/ground_truth_upstream/settings must be (G, {len(upstream)}) upstream values, got shape "
                 f"{truth_settings.shape}" + ("" if upstream else " (the file has no upstream settings)"))
        for key, values in scan.upstream_truth.get("emittances", {}).items():
            if np.shape(values) != (truth_settings.shape[0],):
                fail(f"/ground_truth_upstream/emittances {key} must have {truth_settings.shape[0]} values")
    return lattice


def _attr(node, key: str, source: str):
    if key not in node.attrs:
        raise ScanFileError(f"{source}: attribute {key!r} missing on {node.name}")
    value = node.attrs[key]
    if isinstance(value, np.ndarray) and value.dtype.kind in "OSU" and value.size == 1 and value.ndim == 0:
        value = value.item()
    return value.decode() if isinstance(value, bytes) else value


def _node(handle, path: str, kind, source: str):
    node = handle.get(path)
    if not isinstance(node, kind):
        what = "group" if kind is h5py.Group else "dataset"
        raise ScanFileError(f"{source}: {'/' + path.lstrip('/')} missing" + ("" if node is None else f" (not a {what})"))
    return node


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_scan(path) -> ScanData:
    """Read a scan file and validate it (raises ScanFileError naming the first problem).

    The ground truth's longitudinal reference is the one `write_scan` uses (reference particle at
    t = 0, z = 0), so a written ground truth reads back exactly; see `psr.data.openpmd.read_openpmd`.
    """
    source = str(path)

    def fail(message):
        raise ScanFileError(f"{source}: {message}")

    if Path(path).is_dir():
        raise ScanFileError(f"{source}: is a folder, not a scan file")
    if not Path(path).is_file():
        raise ScanFileError(f"{source}: no such file")
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise ScanFileError(f"{source}: not an HDF5 file ({err})") from None
    with handle:
        psr_format = _text(_attr(handle, "psr_format", source))
        if psr_format != FORMAT:
            raise ScanFileError(f"{source}: psr_format is {psr_format!r}, expected {FORMAT!r} (not a psr scan file)")
        version = _attr(handle, "psr_version", source)
        try:
            version = int(np.asarray(version).reshape(-1)[0])
        except (TypeError, ValueError):
            raise ScanFileError(f"{source}: psr_version must be an integer, got {version!r}") from None
        if version != VERSION:
            raise ScanFileError(f"{source}: psr_version {version} is not supported (this psr reads version {VERSION})")
        p0c, species, charge = (_attr(handle, key, source) for key in ("p0c", "species", "charge"))
        lattice_text = _text(_attr(_node(handle, "lattice", h5py.Group, source), "yaml", source))
        try:
            lattice_items = load_lattice_text(lattice_text, f"{source}:/lattice")
        except ValueError as err:
            raise ScanFileError(str(err)) from None
        settings_node = _node(handle, "settings", h5py.Dataset, source)
        names = [_text(n) for n in np.atleast_1d(_attr(settings_node, "names", source)).reshape(-1)]
        upstream = ([_text(n) for n in np.atleast_1d(settings_node.attrs["upstream"]).reshape(-1)]
                    if "upstream" in settings_node.attrs else [])
        screens = {}
        for name in _node(handle, "screens", h5py.Group, source):
            group = _node(handle, f"screens/{name}", h5py.Group, source)
            images = _node(handle, f"screens/{name}/images", h5py.Dataset, source)
            extras = {}
            for key in ("background", "mask"):
                if key in group:
                    extras[key] = np.asarray(_node(handle, f"screens/{name}/{key}", h5py.Dataset, source)[()])
            if "aligned" in group.attrs:
                extras["aligned"] = _text(_attr(group, "aligned", source))
            screens[name] = ScreenData(
                images=np.asarray(images[()], dtype=np.float32),
                pixel_size=tuple(np.asarray(_attr(group, "pixel_size", source), dtype=np.float64).reshape(-1).tolist()),
                center=tuple(np.asarray(_attr(group, "center", source), dtype=np.float64).reshape(-1).tolist()),
                **extras,
            )
        scan = ScanData(
            lattice=lattice_items, settings=np.asarray(settings_node[()], dtype=np.float64), setting_names=names,
            screens=screens, p0c=p0c, species=_text(species), charge=charge, folder=str(Path(path).parent),
            upstream=upstream,
        )
        if isinstance(handle.get("ground_truth_upstream"), h5py.Group):
            scan.upstream_truth = _read_upstream_truth(handle["ground_truth_upstream"], source)
        scan.p0c, scan.charge = _float(p0c, "p0c", fail), _float(charge, "charge", fail)
        if isinstance(handle.get("provenance"), h5py.Group):
            scan.provenance = {key: _text(_attr(handle["provenance"], key, source)) for key in handle["provenance"].attrs}
        if "ground_truth" in handle:
            truth_node = _node(handle, "ground_truth", h5py.Group, source)
            try:
                truth = read_openpmd(truth_node, p0c=scan.p0c if scan.p0c > 0 else None, t_ref=0.0, z_ref=0.0)
            except ValueError as err:
                raise ScanFileError(f"{source}: /ground_truth is not a valid openPMD bunch: {err}") from None
            try:
                same = sim.get_species(scan.species).name == truth.species
            except ValueError:
                same = True  # validate_scan reports the unknown species
            if not same:
                raise ScanFileError(f"{source}: /ground_truth holds {truth.species}s but the file's species is {scan.species!r}")
            scan.ground_truth = truth.particles
    validate_scan(scan, source)
    return scan


def write_scan(path, scan: ScanData) -> Path:
    """Validate `scan`, then write it to `path` atomically.

    Nothing is written when validation fails; the file is written to a temporary file in the same
    folder and renamed over `path` (os.replace), so a failure never leaves a partial file.
    """
    path = Path(path)
    validate_scan(scan, str(path))
    with atomic_target(path) as tmp, h5py.File(tmp, "w-") as handle:
        handle.attrs["psr_format"] = FORMAT
        handle.attrs["psr_version"] = VERSION
        handle.attrs["p0c"] = float(scan.p0c)
        handle.attrs["species"] = sim.get_species(scan.species).name
        handle.attrs["charge"] = float(scan.charge)
        handle.create_group("lattice").attrs["yaml"] = scan.lattice_yaml
        settings = handle.create_dataset("settings", data=np.asarray(scan.settings, dtype=np.float64))
        settings.attrs["names"] = np.array([str(n) for n in scan.setting_names], dtype=h5py.string_dtype())
        if scan.upstream:
            settings.attrs["upstream"] = np.array([str(n) for n in scan.upstream], dtype=h5py.string_dtype())
        screens = handle.create_group("screens")
        for name, screen in scan.screens.items():
            group = screens.create_group(name)
            group.create_dataset("images", data=np.asarray(screen.images, dtype=np.float32),
                                 compression="gzip", compression_opts=4, shuffle=True)
            group.attrs["pixel_size"] = np.asarray(screen.pixel_size, dtype=np.float64).reshape(2)
            group.attrs["center"] = np.asarray(screen.center, dtype=np.float64).reshape(2)
            for key in ("background", "mask"):
                if getattr(screen, key) is not None:
                    group.create_dataset(key, data=np.asarray(getattr(screen, key), dtype=np.float32))
            if screen.aligned is not None:
                group.attrs["aligned"] = str(screen.aligned)
        if scan.provenance:
            provenance = handle.create_group("provenance")
            for key, value in scan.provenance.items():
                provenance.attrs[str(key)] = str(value)
        if scan.ground_truth is not None:
            write_bunch(handle.create_group("ground_truth"), scan.ground_truth, scan.p0c, scan.species, scan.charge)
        if scan.upstream_truth is not None:
            group = handle.create_group("ground_truth_upstream")
            group.create_dataset("settings", data=np.asarray(scan.upstream_truth["settings"], dtype=np.float64))
            keys = list(scan.upstream_truth.get("emittances", {}))
            table = np.stack([np.asarray(scan.upstream_truth["emittances"][k], dtype=np.float64) for k in keys], -1)
            group.create_dataset("emittances", data=table).attrs["names"] = np.array(keys, dtype=h5py.string_dtype())
            if scan.upstream_truth.get("particles") is not None:
                group.create_dataset("particles", data=np.asarray(scan.upstream_truth["particles"], dtype=np.float32),
                                     compression="gzip", compression_opts=4, shuffle=True)
    return path


def _read_upstream_truth(group, source: str) -> dict:
    """/ground_truth_upstream as {"settings": (G, U), "emittances": {key: (G,)}, "particles": (G, n, 6) or None}."""
    settings = _node(group, "settings", h5py.Dataset, source)[()]
    emittances = _node(group, "emittances", h5py.Dataset, source)
    keys = [_text(n) for n in np.atleast_1d(_attr(emittances, "names", source)).reshape(-1)]
    table = np.asarray(emittances[()], dtype=np.float64).reshape(len(settings), len(keys))
    particles = np.asarray(group["particles"][()], dtype=np.float64) if "particles" in group else None
    return {"settings": np.asarray(settings, dtype=np.float64), "emittances": {k: table[:, i] for i, k in enumerate(keys)},
            "particles": particles}
