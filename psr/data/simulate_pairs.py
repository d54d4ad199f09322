"""`psr simulate-pairs`: surrogate training data (a `pairs` file) from psr's own reference physics."""

from pathlib import Path

import numpy as np
import torch

import sim
from psr.data.checks import check_output_folder
from psr.data.lattices import build_lattice
from psr.data.openpmd import read_openpmd
from psr.data.pairs import PairsData, write_pairs
from psr.data.synthetic import SyntheticBeam


def _draw(ranges: dict[str, list[float]], rng: np.random.Generator, what: str) -> dict[str, float]:
    """One value per name, uniform in its [low, high] (log-uniform for emittances and betas, which span decades)."""
    out = {}
    for name, bounds in (ranges or {}).items():
        low, high = (float(v) for v in bounds) if len(bounds) == 2 else (None, None)
        if low is None or not high >= low:
            raise ValueError(f"{what}.{name} must be [low, high] with low <= high, got {bounds!r}")
        if name.startswith(("emittance", "beta")) and low > 0:
            out[name] = float(np.exp(rng.uniform(np.log(low), np.log(high))))
        else:
            out[name] = float(rng.uniform(low, high))
    return out


def _perturbed(particles: np.ndarray, perturb: dict[str, float], rng: np.random.Generator) -> np.ndarray:
    """Per transverse plane about its mean: u -> s_u u, pu -> s_p pu + g u with s_u, s_p = exp(U(-scale, scale))
    and g = U(-shear, shear) std(pu) / std(u): beams near a given one (sizes +-scale in log, tilted)."""
    p = particles.copy()
    scale, shear = float(perturb.get("scale", 0.0)), float(perturb.get("shear", 0.0))
    for i in (0, 2):
        s_u, s_p = np.exp(rng.uniform(-scale, scale, 2))
        u, pu = p[:, i] - p[:, i].mean(), p[:, i + 1] - p[:, i + 1].mean()
        g = rng.uniform(-shear, shear) * pu.std() / max(u.std(), 1e-30)
        p[:, i], p[:, i + 1] = p[:, i].mean() + s_u * u, p[:, i + 1].mean() + s_p * pu + g * u
    return p


def _beam_files(paths: list[str], p0c: float) -> list[np.ndarray]:
    """The particles (N, 6) of openPMD beam files at the section's entrance, relative to `p0c` [eV]; one clear
    error for a missing file or another format."""
    beams = []
    for path in paths:
        if not Path(path).is_file():
            raise ValueError(f"beam_files: {path}: " + ("is a folder" if Path(path).is_dir() else "no such file"))
        try:
            beam = read_openpmd(path, p0c=p0c)
        except (OSError, KeyError, ValueError) as err:
            raise ValueError(f"beam_files: {path}: not an openPMD beam file ({err})") from None
        beams.append(beam.particles)
    return beams


def simulate_pairs(
    output: str,
    lattice: str,
    p0c: float,
    n_beams: int = 100,
    n_particles: int = 10_000,
    beam: dict[str, float] | None = None,
    beam_ranges: dict[str, list[float]] | None = None,
    settings: dict[str, list[float]] | None = None,
    upstream: str | None = None,
    upstream_settings: dict[str, list[float]] | None = None,
    species: str = "electron",
    charge: float = 0.0,
    space_charge: dict | None = None,
    seed: int = 0,
    beam_files: list[str] | None = None,
    perturb: dict[str, float] | None = None,
) -> Path:
    """Track M input beams through a section with psr's reference physics and write them and their outputs.

    Args:
        output: the pairs file to write (HDF5, DESIGN.md "Surrogate training data").
        lattice: lattice file of the section the surrogate will replace.
        p0c: reference momentum [eV].
        n_beams: M, the number of input beams; n_particles: N per beam.
        beam: fixed `psr.data.SyntheticBeam` arguments of every input beam (e.g. sigma_z).
        beam_ranges: {argument: [low, high]}: drawn for each beam, uniformly (log-uniformly for emittance_*
            and beta_*): the documented distribution of input beams.
        settings: {"<element>.<parameter>" of the section: [low, high]}: drawn uniformly for each beam.
        upstream: lattice file of elements before the section (e.g. the scanned quadrupole): each beam is
            tracked through it first (with `upstream_settings` drawn per beam, and space charge), so the
            input beams are those the section sees in the machine.
        species, charge: the bunch (charge [C] is what space charge acts with).
        space_charge: {"grid_shape": [nx, ny, nz], "max_step": metres}: the reference physics' space charge.
        seed: seeds the draws and the beams.
        beam_files: openPMD beam files (e.g. fits' beam.h5, at the section's entrance) to draw the input beams
            from instead of `beam` / `beam_ranges`: each input beam is n_particles of a random file's particles
            (without replacement where it has that many), then perturbed (`perturb`).
        perturb: {"scale": s, "shear": g} for beam_files: per transverse plane, position and momentum spreads
            scaled by exp(U(-s, s)) each and a shear pu += U(-g, g) std(pu)/std(u) u (default 0.3, 0.3).
    """
    if isinstance(n_beams, bool) or not isinstance(n_beams, int) or n_beams < 1:
        raise ValueError(f"n_beams must be a positive integer, got {n_beams!r}")
    if isinstance(n_particles, bool) or not isinstance(n_particles, int) or n_particles < 2:
        raise ValueError(f"n_particles must be an integer >= 2, got {n_particles!r}")
    if not p0c > 0:
        raise ValueError(f"p0c must be a positive momentum in eV, got {p0c}")
    check_output_folder(Path(output).parent, "output")
    space = sim.SpaceCharge.from_config(space_charge)
    if space is not None and not charge > 0:
        raise ValueError("space_charge is set but charge is 0: give the bunch charge [C]")
    lattices = {}
    for what, path in (("lattice", lattice), ("upstream", upstream)):
        if path is None:
            continue
        if not Path(path).is_file():
            raise ValueError(f"{what} {path}: " + ("is a folder" if Path(path).is_dir() else "no such file"))
        items = sim.lattice.load_lattice_text(Path(path).read_text(), path)
        try:
            lattices[what] = (items, build_lattice(items, Path(path).parent, space).double())
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    section_items, section = lattices["lattice"]
    names = list(settings or {})
    for table, lat, what in ((settings, section, "settings"), (upstream_settings, lattices.get("upstream", (0, None))[1],
                                                                 "upstream_settings")):
        if table and lat is None:
            raise ValueError(f"{what} given without an upstream lattice")
        if table:
            try:
                lat.split_settings(dict.fromkeys(table, 0.0))
            except KeyError as err:
                raise ValueError(f"{what}: {err.args[0]}") from None
    if beam_files is not None:
        if beam or beam_ranges:
            raise ValueError("beam_files replaces beam / beam_ranges: give one or the other")
        if isinstance(beam_files, str) or not beam_files:
            raise ValueError(f"beam_files must be a non-empty list of openPMD files, got {beam_files!r}")
        perturb = {"scale": 0.3, "shear": 0.3} if perturb is None else dict(perturb)
        unknown = set(perturb) - {"scale", "shear"}
        if unknown or not all(isinstance(v, (int, float)) and 0 <= v < 5 for v in perturb.values()):
            raise ValueError(f"perturb must be {{scale: s, shear: g}} with 0 <= s, g < 5, got {perturb!r}")
        files = _beam_files(list(beam_files), p0c)
    elif perturb is not None:
        raise ValueError("perturb is for beam_files")
    else:
        try:
            SyntheticBeam(**(beam or {}), **{k: float(v[0]) for k, v in (beam_ranges or {}).items()})
        except TypeError as err:
            raise ValueError(f"beam / beam_ranges: {err}") from None
    rng = np.random.default_rng(seed)
    beams_in, beams_out, rows = [], [], []
    for m in range(n_beams):
        if beam_files is None:
            args = {**(beam or {}), **_draw(beam_ranges, rng, "beam_ranges")}
            particles = SyntheticBeam(**args).sample(n_particles, seed=seed * 100_003 + m).double()
        else:
            source = files[rng.integers(len(files))]
            chosen = rng.choice(len(source), n_particles, replace=len(source) < n_particles)
            particles = torch.as_tensor(_perturbed(source[chosen], perturb, rng)).double()
        values = _draw(settings, rng, "settings")
        up = _draw(upstream_settings, rng, "upstream_settings")
        bunch = sim.ParticleBeam(particles, p0c=p0c, species=species, charge=charge)
        with torch.no_grad():
            if "upstream" in lattices:
                bunch = lattices["upstream"][1](bunch, {k: torch.tensor(v, dtype=torch.float64) for k, v in up.items()}).beam
            out = section(bunch, {k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()}).beam
        beams_in.append(bunch.particles.float().numpy())
        beams_out.append(out.particles.float().numpy())
        rows.append([values[n] for n in names])
    pairs = PairsData(lattice=section_items, settings=np.asarray(rows, dtype=np.float64).reshape(n_beams, len(names)),
                      setting_names=names, beams_in=np.stack(beams_in), beams_out=np.stack(beams_out), p0c=float(p0c),
                      species=species, charge=float(charge))
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    return write_pairs(output, pairs)
