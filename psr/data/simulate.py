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
from psr.data.emittances import PLANES_4D, emittance_table
from psr.data.synthetic import SyntheticBeam, SyntheticInjector
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


def upstream_scan_settings(settings: dict[str, list[float]], upstream: list[str], per_point: int | None,
                           grid: bool) -> tuple[list[str], np.ndarray]:
    """Settings of a scan at many upstream settings: the Cartesian product of the upstream lists, and at the
    g-th upstream setting `per_point` rows of the (zipped, L rows) lattice lists, rows (g + j L // per_point)
    mod L for j < per_point: few lattice settings at each upstream setting, different ones at neighbours.
    Without per_point, as `scan_settings`."""
    unknown = [n for n in upstream if n not in settings]
    if unknown:
        raise ValueError(f"upstream names {unknown}, which have no list of values in settings {sorted(settings)}")
    if per_point is None:
        return scan_settings(settings, grid)
    lattice_names = [n for n in settings if n not in upstream]
    if not lattice_names:
        raise ValueError("lattice_rows_per_upstream needs lattice settings (e.g. Q1.k1) besides the upstream ones")
    _, points = scan_settings({n: settings[n] for n in upstream}, grid=True)
    _, rows = scan_settings({n: settings[n] for n in lattice_names}, grid=False)
    if not 1 <= per_point <= len(rows):
        raise ValueError(f"lattice_rows_per_upstream must be from 1 to the {len(rows)} lattice rows, got {per_point}")
    table = [np.concatenate([point, rows[(g + j * len(rows) // per_point) % len(rows)]])
             for g, point in enumerate(points) for j in range(per_point)]
    return list(upstream) + lattice_names, np.array(table, dtype=np.float64)


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
    beam: SyntheticBeam | SyntheticInjector | None = None,
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
    upstream: list[str] | None = None,
    lattice_rows_per_upstream: int | None = None,
    truth_particles: int = 1000,
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
        upstream: names among `settings` that are upstream machine settings (DESIGN.md "Conditional beams"),
            e.g. [GUN.solenoid, LASER.spot]: `beam` is then a `SyntheticInjector`, whose beam at each distinct
            upstream setting is sampled (`n_particles`, the same seed) and tracked at the rows of that setting.
            The file lists them in its /settings attribute upstream and holds, instead of /ground_truth, the
            true emittances (from all n_particles) and `truth_particles` particles of each upstream setting's
            beam (/ground_truth_upstream).
        lattice_rows_per_upstream: with upstream, take the product of the upstream lists and at each upstream
            setting only this many rows of the zipped lattice lists, different ones at neighbouring upstream
            settings (`upstream_scan_settings`).
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
    upstream = [str(n) for n in (upstream or [])]
    if upstream and not isinstance(beam, SyntheticInjector):
        raise ValueError("upstream settings need a beam that depends on them (psr.data.SyntheticInjector)")
    if isinstance(beam, SyntheticInjector) and sorted(upstream) != sorted(beam.setting_names):
        raise ValueError(f"the injector's beam depends on {beam.setting_names}: list them in upstream (got {upstream})")
    if lattice_rows_per_upstream is not None and not upstream:
        raise ValueError("lattice_rows_per_upstream needs upstream settings")
    names, table = upstream_scan_settings(settings, upstream, lattice_rows_per_upstream, grid)
    lattice_names = [n for n in names if n not in upstream]
    corrections = parse_corrections(machine, lat, lattice_names, where="machine", value_key="value", extra_keys=())
    if beam is not None:
        check_memory(SIMULATE_BYTES_PER_PARTICLE_SETTING * n_particles * len(table),
                     f"n_particles={n_particles} at {len(table)} setting(s)")
    lat = lat.to(torch.float64)
    values = {n: torch.as_tensor(table[:, i]) for i, n in enumerate(names) if n not in upstream}
    values = apply_corrections(values, lat, corrections, [torch.as_tensor(c.value0) for c in corrections])
    upstream_truth = None
    if upstream:
        images, upstream_truth = _track_injector(beam, upstream, names, table, values, lat, n_particles, seed,
                                                 truth_particles, p0c, species, charge)
        particles = None
    else:
        if beam is not None:
            particles = beam.sample(n_particles, seed=seed)
        else:
            loaded = read_openpmd(beam_file, p0c=p0c)
            particles = torch.as_tensor(loaded.particles, dtype=torch.float64)
        truth = sim.ParticleBeam(particles.to(torch.float64), p0c=p0c, species=species, charge=charge)
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
        p0c=float(p0c), species=species, charge=float(charge),
        ground_truth=None if particles is None else particles.numpy(), upstream=upstream, upstream_truth=upstream_truth,
    )
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    write_scan(output, scan)
    return Path(output)


def _track_injector(injector: SyntheticInjector, upstream, names, table, values, lat, n_particles, seed,
                    truth_particles, p0c, species, charge):
    """Images (K, H, W) per screen of an injector's beams, each tracked at the rows of its upstream setting, and
    the true beams ({"settings": (G, U), "emittances": {key: (G,)}, "particles": (G, n, 6)})."""
    columns = [names.index(n) for n in upstream]
    points, inverse = np.unique(table[:, columns], axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort([np.flatnonzero(inverse == g)[0] for g in range(len(points))])  # first-appearance order
    images, tables, samples = {}, [], []
    for g in order:
        rows = torch.as_tensor(np.flatnonzero(inverse == g))
        particles = injector.at(dict(zip(upstream, points[g]))).sample(n_particles, seed=seed)
        beam = sim.ParticleBeam(particles, p0c=p0c, species=species, charge=charge)
        with torch.no_grad():
            tracked = lat(beam, {n: v[rows] for n, v in values.items()}).images
        for name, stack in tracked.items():
            images.setdefault(name, torch.zeros(len(table), *stack.shape[-2:], dtype=stack.dtype))[rows] = stack
        tables.append(emittance_table(particles.numpy(), p0c, species, PLANES_4D))
        samples.append(particles[:truth_particles].numpy())
    truth = {"settings": points[order], "emittances": {k: np.array([t[k] for t in tables]) for k in tables[0]},
             "particles": np.stack(samples)}
    return images, truth
