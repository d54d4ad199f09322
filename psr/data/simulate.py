"""`psr simulate`: make a synthetic scan data file from a ground-truth beam and a lattice."""

import itertools
from pathlib import Path

import numpy as np
import torch

import sim

from psr.data.calibration import apply_corrections, parse_corrections
from psr.data.lattices import build_lattice, rebase_weights
from psr.data.openpmd import read_openpmd
from psr.data.scanfile import ScanData, ScreenData, write_scan
from psr.data.synthetic import SyntheticBeam
from psr.data.checks import SIMULATE_BYTES_PER_PARTICLE_SETTING, check_memory, check_output_folder


def scan_settings(settings: dict[str, list[float]], grid: bool) -> tuple[list[str], np.ndarray]:
    """Setting names and the (K, P) table: equal-length lists zipped, or their Cartesian product."""
    if not settings:
        raise ValueError("settings must name at least one '<element>.<parameter>' with a list of values")
    names = list(settings)
    columns = [np.asarray(settings[n], dtype=np.float64).ravel() for n in names]
    if grid:
        table = np.array(list(itertools.product(*columns)), dtype=np.float64)
    else:
        lengths = {len(c) for c in columns}
        if len(lengths) != 1:
            raise ValueError(f"settings lists have different lengths {[len(c) for c in columns]}; "
                             "give equal lengths or set grid: true")
        table = np.stack(columns, axis=-1)
    return names, table.reshape(-1, len(names))


def measured_settings(measure: dict | None, screens, names: list[str], table: np.ndarray) -> dict[str, np.ndarray]:
    """{screen: (K,) bool}: where each screen is read, from `measure` (see `simulate`)."""
    measure = measure or {}
    unknown = set(measure) - set(screens)
    if unknown:
        raise ValueError(f"measure names unknown screen(s) {sorted(unknown)}; screens: {sorted(screens)}")
    taken = {}
    for screen in screens:
        flags = np.ones(table.shape[0], dtype=bool)
        for setting, value in (measure.get(screen) or {}).items():
            if setting not in names:
                raise ValueError(f"measure.{screen}: {setting!r} is not a scanned setting; scanned: {names}")
            column = table[:, names.index(setting)]
            flags &= np.isclose(column, float(value), rtol=1e-9, atol=1e-12)
        if not flags.any():
            raise ValueError(f"measure.{screen}: no setting matches {measure[screen]}, so the screen would see nothing")
        taken[screen] = flags
    return taken


def simulate(
    output: str,
    lattice: str,
    settings: dict[str, list[float]],
    p0c: float,
    beam: SyntheticBeam | None = None,
    beam_file: str | None = None,
    species: str = "electron",
    charge: float = 0.0,
    n_particles: int = 50_000,
    grid: bool = False,
    noise: float = 0.0,
    seed: int = 0,
    measure: dict[str, dict[str, float]] | None = None,
    space_charge: dict | None = None,
    machine: dict[str, dict] | None = None,
) -> Path:
    """Track a ground-truth beam through `lattice` (a lattice file) at every setting and write a scan file.

    Args:
        output: scan file to write (HDF5, contract v1); relative paths are taken from the working folder.
        lattice: lattice file (YAML or JSON) with at least one Screen.
        settings: {"Q1.k1": [values...], ...}: one list per scanned parameter.
        p0c: reference momentum [eV].
        beam: a synthetic ground-truth beam (or give beam_file).
        beam_file: an openPMD-beamphysics particle file to use as the ground truth instead.
        species: electron, positron or proton.
        charge: bunch charge [C].
        n_particles: particles sampled from `beam` (all are stored as the ground truth).
        grid: take the Cartesian product of the settings lists instead of zipping them.
        noise: rms of Gaussian pixel noise relative to each image's peak (clipped at zero).
        seed: random seed for the beam and the noise.
        measure: which screen is read at which settings, e.g. {"YAG_BENT": {"B1.angle": 0.35}}: the
            screen is measured where every named setting equals the given value (1e-9 relative), and
            its image is NaN (not measured) elsewhere. Screens not named are measured everywhere.
        space_charge: {"grid_shape": [nx, ny, nz], "max_step": metres, "extent": k} to track with 3D space charge
            of `charge` (see `sim.SpaceCharge`); None: off.
        machine: how the simulated machine differs from its model, e.g. {"Q1.k1": {"kind": "scale", "value":
            0.93}, "Q2.x_offset": {"kind": "offset", "value": 5e-4}, "YAG.center": {"kind": "offset", "value":
            [3e-4, 0]}} (as `model.calibrate`, DESIGN.md "Calibration"): the images are made with the corrected
            values; the scan file keeps the nominal lattice and settings, as a real machine's would.
    """
    if (beam is None) == (beam_file is None):
        raise ValueError("give exactly one of beam (a synthetic beam) or beam_file (an openPMD file)")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    if isinstance(n_particles, bool) or not isinstance(n_particles, int) or n_particles < 2:
        raise ValueError(f"n_particles must be an integer >= 2, got {n_particles!r}")
    if not p0c > 0:
        raise ValueError(f"p0c must be a positive momentum in eV, got {p0c}")
    check_output_folder(Path(output).parent, "output")
    for what, path in (("lattice", lattice), ("beam_file", beam_file)):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{what} {path}: " + ("is a folder" if Path(path).is_dir() else "no such file"))
    lattice_items = sim.lattice.load_lattice_text(Path(lattice).read_text(), lattice)
    space_charge = sim.SpaceCharge.from_config(space_charge)
    if space_charge is not None and not charge:
        raise ValueError("space_charge is set but charge is 0: give the bunch charge [C]")
    try:
        lat = build_lattice(lattice_items, Path(lattice).parent, space_charge)
    except ValueError as err:
        raise ValueError(f"{lattice}: {err}") from None
    if not lat.screens:
        raise ValueError(f"{lattice}: the lattice has no Screen, so there is nothing to image")
    names, table = scan_settings(settings, grid)
    corrections = parse_corrections(machine, lat, names, where="machine", value_key="value", extra_keys=())
    if beam is not None:
        check_memory(SIMULATE_BYTES_PER_PARTICLE_SETTING * n_particles * len(table),
                     f"n_particles={n_particles} at {len(table)} setting(s)")
    if beam is not None:
        particles = beam.sample(n_particles, seed=seed)
    else:
        loaded = read_openpmd(beam_file, p0c=p0c)
        particles = torch.as_tensor(loaded.particles, dtype=torch.float64)
    truth = sim.ParticleBeam(particles.to(torch.float64), p0c=p0c, species=species, charge=charge)
    lat = lat.to(torch.float64)
    values = {n: torch.as_tensor(table[:, i]) for i, n in enumerate(names)}
    values = apply_corrections(values, lat, corrections, [torch.as_tensor(c.value0) for c in corrections])
    with torch.no_grad():
        images = lat(truth, values).images
    rng = np.random.default_rng(seed)
    taken = measured_settings(measure, lat.screens, names, table)
    screens = {}
    for name, screen in lat.screens.items():
        img = images[name].numpy()
        if noise > 0:
            peak = img.max(axis=(-1, -2), keepdims=True)
            img = np.clip(img + noise * peak * rng.standard_normal(img.shape), 0, None)
        img = np.where(taken[name][:, None, None], img, np.nan)
        screens[name] = ScreenData(
            images=img.astype(np.float32),
            pixel_size=tuple(screen.pixel_size.tolist()),
            center=tuple(screen.center.tolist()),
        )
    scan = ScanData(
        lattice=rebase_weights(lattice_items, Path(lattice).parent, Path(output).parent), settings=table, setting_names=names, screens=screens,
        p0c=float(p0c), species=species, charge=float(charge), ground_truth=particles.numpy(),
    )
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    write_scan(output, scan)
    return Path(output)
