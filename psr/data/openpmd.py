"""openPMD-beamphysics particle files (h5py only), converted to and from Bmad coordinates.

The layout is that of `beamphysics.ParticleGroup.write` (`write_pmd_bunch`), so the files load in
`beamphysics.ParticleGroup(path)`; beamphysics itself is not imported here.

Bmad coordinates (psr's convention, DESIGN.md): x [m], px = Px/P0, y [m], py = Py/P0,
z = -beta c (t - t_ref) [m], pz = (P - P0)/P0, with reference momentum p0c [eV].
"""

import os
import posixpath
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np

from sim.species import ELEMENTARY_CHARGE, SPEED_OF_LIGHT, get_species

from psr.data.atomic import atomic_target

EV_PER_C_SI = ELEMENTARY_CHARGE / SPEED_OF_LIGHT  # 1 eV/c in kg m/s (unitSI of momentum in eV/c)

_UNITS = {  # record -> (unitSI, unitDimension (L, M, T, I, theta, N, J), unitSymbol), as beamphysics writes them
    "position": (1.0, (1, 0, 0, 0, 0, 0, 0), "m"),
    "momentum": (EV_PER_C_SI, (1, 1, -1, 0, 0, 0, 0), "eV/c"),
    "time": (1.0, (0, 0, 1, 0, 0, 0, 0), "s"),
    "weight": (1.0, (0, 0, 1, 1, 0, 0, 0), "C"),
    "particleStatus": (1.0, (0, 0, 0, 0, 0, 0, 0), "1"),
}

ROOT_ATTRIBUTES = {  # what ParticleGroup.write(path) puts on the file root
    "basePath": "/", "dataType": "openPMD", "openPMD": "2.0.0",
    "openPMDextension": "BeamPhysics;SpeciesType", "particlesPath": "particles",
}


class OpenPMDBeam(NamedTuple):
    """A bunch read from openPMD.

    particles: (N, 6) float64 in Bmad coordinates; p0c: reference momentum [eV]; species: name;
    charge: bunch charge magnitude [C]; weights: (N,) charge magnitude of each macro-particle [C].
    """

    particles: np.ndarray
    p0c: float
    species: str
    charge: float
    weights: np.ndarray | None = None


def _as_numpy(particles) -> np.ndarray:
    if hasattr(particles, "detach"):  # a torch tensor (torch is not needed to write files)
        particles = particles.detach().cpu().numpy()
    return np.asarray(particles, dtype=np.float64)


def physical_mask(particles) -> np.ndarray:
    """(N,) True for particles (N, 6) with finite coordinates and forward momentum, (1 + pz)^2 > px^2 + py^2."""
    p = _as_numpy(particles)
    with np.errstate(invalid="ignore", over="ignore"):
        return np.isfinite(p).all(axis=1) & ((1 + p[:, 5]) ** 2 > p[:, 1] ** 2 + p[:, 3] ** 2)


def check_particles(particles) -> np.ndarray:
    """(N, 6) float64 finite Bmad particles whose total momentum exceeds their transverse momentum, or ValueError."""
    p = _as_numpy(particles)
    if p.ndim != 2 or p.shape[1] != 6:
        raise ValueError(f"particles must have shape (N, 6), got {p.shape}")
    if p.shape[0] == 0:
        raise ValueError("particles: the bunch is empty (N = 0)")
    if not np.isfinite(p).all():
        raise ValueError("particles contain NaN or infinite coordinates")
    if ((1 + p[:, 5]) ** 2 <= p[:, 1] ** 2 + p[:, 3] ** 2).any():
        bad = int(((1 + p[:, 5]) ** 2 <= p[:, 1] ** 2 + p[:, 3] ** 2).sum())
        raise ValueError(f"particles: {bad} particle(s) have (1 + pz)^2 <= px^2 + py^2 (no forward momentum)")
    return p


def _write_component(group: h5py.Group, name: str, data: np.ndarray, record: str) -> None:
    """A dataset, or (all values equal) a group with attrs value and shape, like beamphysics' write_component_data."""
    unit_si, dimension, symbol = _UNITS[record]
    if np.all(data == data.flat[0]):
        node = group.create_group(name)
        node.attrs["value"] = data.flat[0]
        node.attrs["shape"] = data.shape
    else:
        group[name] = data
        node = group[name]
    node.attrs["unitSI"] = float(unit_si)
    node.attrs["unitDimension"] = np.asarray(dimension, dtype=np.float64)
    node.attrs["unitSymbol"] = symbol


def write_bunch(group: h5py.Group, particles, p0c: float, species: str = "electron", charge: float = 0.0) -> h5py.Group:
    """Write a bunch under group/<species>/ (beamphysics' write_pmd_bunch layout); returns the species group.

    Bmad coordinates at fixed s become: Px = px p0c, Py = py p0c, P = (1 + pz) p0c,
    Pz = sqrt(P^2 - Px^2 - Py^2) [eV/c]; position z = 0; t = -z_bmad / (beta c) [s] with beta each
    particle's own speed (the reference particle passes at t = 0); weight = charge / N [C];
    particleStatus = 1.
    """
    spec = get_species(species)
    p = check_particles(particles)
    p0c = float(p0c)
    if not (np.isfinite(p0c) and p0c > 0):
        raise ValueError(f"p0c must be a positive momentum in eV, got {p0c}")
    charge = float(charge)
    if not (np.isfinite(charge) and charge >= 0):
        raise ValueError(f"charge is a magnitude in coulombs and must be >= 0, got {charge}")
    n = p.shape[0]
    px, py, ptot = p[:, 1] * p0c, p[:, 3] * p0c, (1 + p[:, 5]) * p0c
    beta = ptot / np.sqrt(ptot**2 + spec.mass_eV**2)
    bunch = group.create_group(spec.name)
    bunch.attrs["speciesType"] = np.bytes_(spec.name)
    bunch.attrs["numParticles"] = n
    bunch.attrs["totalCharge"] = charge
    bunch.attrs["chargeUnitSI"] = 1.0
    components = {
        "position/x": (p[:, 0], "position"),
        "momentum/x": (px, "momentum"),
        "position/y": (p[:, 2], "position"),
        "momentum/y": (py, "momentum"),
        "position/z": (np.zeros(n), "position"),
        "momentum/z": (np.sqrt(ptot**2 - px**2 - py**2), "momentum"),
        "time": (-p[:, 4] / (beta * SPEED_OF_LIGHT), "time"),
        "particleStatus": (np.ones(n, dtype=np.int64), "particleStatus"),
        "weight": (np.full(n, charge / n), "weight"),
    }
    for name, (data, record) in components.items():
        _write_component(bunch, name, data, record)
    return bunch


def write_openpmd(target, particles, p0c: float, species: str = "electron", charge: float = 0.0) -> None:
    """Write Bmad particles (N, 6) (numpy or torch) as openPMD-beamphysics data.

    target: a path: a new file with the root attributes of `ParticleGroup.write(path)` and the bunch
    under /particles/<species>/; it is written to a temporary file in the same folder and renamed,
    so a failure leaves no partial file. An open h5py.File: root attributes and /particles/<species>/
    (as ParticleGroup.write does with a file). Any other h5py.Group: the bunch under
    group/<species>/ (as in a scan file's /ground_truth). charge: bunch charge magnitude [C].
    Conversion: see `write_bunch`.
    """
    if isinstance(target, h5py.File):
        for key, value in ROOT_ATTRIBUTES.items():
            target.attrs[key] = np.bytes_(value)
        write_bunch(target.create_group("particles"), particles, p0c, species, charge)
        return
    if isinstance(target, h5py.Group):
        write_bunch(target, particles, p0c, species, charge)
        return
    path = Path(os.path.expandvars(os.fspath(target)))
    check_particles(particles)  # fail before touching the file system
    with atomic_target(path) as tmp, h5py.File(tmp, "w-") as handle:
        write_openpmd(handle, particles, p0c, species, charge)


# ---------------------------------------------------------------------------------------- reading


def _text(value) -> str:
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(-1)[0]
    return value.decode() if isinstance(value, bytes) else str(value)


def _is_species_group(node) -> bool:
    return (isinstance(node, h5py.Group) and isinstance(node.get("position"), h5py.Group)
            and isinstance(node.get("momentum"), h5py.Group))


def _where(node) -> str:
    return f"{node.file.filename}:{node.name}"


def _species_in(group: h5py.Group) -> h5py.Group:
    """The one species group in a particles group (or the group itself when it holds the records)."""
    if _is_species_group(group):
        return group
    species = [key for key, child in group.items() if _is_species_group(child)]
    if len(species) == 1:
        return group[species[0]]
    if len(species) > 1:
        raise ValueError(f"{_where(group)} holds several species {species}; pass the species group itself")
    raise ValueError(f"{_where(group)} is not openPMD particle data (no species group with position and momentum records)")


def _find_bunch(group: h5py.Group) -> h5py.Group:
    """The species group, from a file root (openPMD attributes), a particles group or the species group."""
    if _is_species_group(group):
        return group
    if "particlesPath" in group.attrs and "basePath" in group.attrs:
        base, particles_path = _text(group.attrs["basePath"]), _text(group.attrs["particlesPath"])
        if "%T" in base:  # iteration-based layout, e.g. /data/%T/: take the only iteration
            prefix, suffix = base.split("%T", 1)
            iterations = list(group[prefix]) if prefix in group else []
            if len(iterations) != 1:
                raise ValueError(f"{_where(group)}: expected one iteration under {prefix}, found {iterations}")
            base = prefix + iterations[0] + suffix
        location = posixpath.normpath(posixpath.join(group.name, base.lstrip("/"), particles_path))
        if location not in group.file or not isinstance(group.file[location], h5py.Group):
            raise ValueError(f"{_where(group)}: particles group {location} (basePath + particlesPath) missing")
        return _species_in(group.file[location])
    if not any(_is_species_group(child) for child in group.values()) and isinstance(group.get("particles"), h5py.Group):
        return _species_in(group["particles"])
    return _species_in(group)


def _component(bunch: h5py.Group, name: str, unit_factor: float = 1.0, required: bool = True) -> np.ndarray | None:
    """A component in SI (times unit_factor), constant groups expanded, with its openPMD offset record added."""
    if name not in bunch:
        if required:
            raise ValueError(f"{_where(bunch)}: openPMD component {name!r} missing")
        return None
    record, _, axis = name.partition("/")
    node = bunch[name]
    if isinstance(node, h5py.Group):
        if "value" not in node.attrs or "shape" not in node.attrs:
            raise ValueError(f"{_where(node)}: a constant component needs attributes 'value' and 'shape'")
        shape = tuple(int(s) for s in np.atleast_1d(node.attrs["shape"]))
        data = np.full(shape, float(np.real(node.attrs["value"])), dtype=np.float64)
    else:
        data = np.asarray(node[()], dtype=np.float64)
    data = data.reshape(-1) * (float(np.asarray(node.attrs.get("unitSI", 1.0)).reshape(-1)[0]) * unit_factor)
    offset_name = record + "Offset" + ("/" + axis if axis else "")
    if offset_name in bunch:
        data = data + _component(bunch, offset_name, unit_factor)
    return data


def read_openpmd(source, p0c: float | None = None, *, t_ref: float | None = None,
                 z_ref: float | None = None) -> OpenPMDBeam:
    """Read an openPMD-beamphysics bunch into Bmad coordinates.

    source: a file path, or an h5py group: a file root (openPMD attributes basePath/particlesPath,
    one iteration), a particles group holding one species subgroup, or the species group itself.
    Components stored as constant groups (attrs value, shape), unitSI scaling and position/
    momentum/time offset records are handled. p0c [eV] defaults to the (weighted) mean total
    momentum. Particle status is ignored (every particle is returned); `weights` keeps each
    macro-particle's charge.

    Longitudinal coordinate:
    - z-coordinates (all particles at one position z, times differ; what `write_openpmd` writes):
      z_bmad = -beta c (t - t_ref), beta each particle's own speed. Exact.
    - t-coordinates (all particles at one time, positions z differ, e.g. the /ground_truth of the
      shared GPSR example): z_bmad = z - z_ref. This is approximate: it neglects the drift of each
      particle to the common position (first order in the bunch length times the angles and
      energy spread), fine for a bunch short compared with the lattice.
    - both differ: z_bmad = (z - z_ref) - beta c (t - t_ref) (same approximation).
    t_ref and z_ref default to the mean time and position; a reference given for a coordinate that
    is the same for every particle is ignored (that common value is the reference).
    """
    if not isinstance(source, h5py.Group):
        path = Path(os.path.expandvars(os.fspath(source)))
        try:
            handle = h5py.File(path, "r")
        except OSError as err:
            raise ValueError(f"{path}: cannot open as HDF5 ({err})") from None
        with handle:
            return read_openpmd(handle, p0c, t_ref=t_ref, z_ref=z_ref)
    bunch = _find_bunch(source)
    species_name = _text(bunch.attrs["speciesType"]) if "speciesType" in bunch.attrs else bunch.name.rsplit("/", 1)[-1]
    try:
        spec = get_species(species_name)
    except ValueError as err:
        raise ValueError(f"{_where(bunch)}: {err}") from None
    x, y, z = (_component(bunch, f"position/{c}") for c in "xyz")
    to_ev = 1.0 / EV_PER_C_SI  # momenta: SI (kg m/s) -> eV/c
    mx, my, mz = (_component(bunch, f"momentum/{c}", to_ev) for c in "xyz")
    t = _component(bunch, "time")
    n = x.size
    lengths = {name: a.size for name, a in zip(("x", "y", "z", "px", "py", "pz", "t"), (x, y, z, mx, my, mz, t))}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{_where(bunch)}: components have different lengths {lengths}")
    if n == 0:
        raise ValueError(f"{_where(bunch)}: the bunch holds no particles")
    weight = _component(bunch, "weight", required=False)
    total_charge = None
    if "totalCharge" in bunch.attrs:
        total_charge = abs(float(np.asarray(bunch.attrs["totalCharge"]).reshape(-1)[0])
                           * float(np.asarray(bunch.attrs.get("chargeUnitSI", 1.0)).reshape(-1)[0]))
    if weight is None:
        weight = np.full(n, (total_charge or 0.0) / n)
    elif weight.size == 1:
        weight = np.full(n, weight[0])
    elif weight.size != n:
        raise ValueError(f"{_where(bunch)}: weight has {weight.size} entries for {n} particles")
    weight = np.abs(weight)
    charge = total_charge if total_charge is not None else float(weight.sum())

    ptot = np.sqrt(mx**2 + my**2 + mz**2)
    if p0c is None:
        p0c = float(np.average(ptot, weights=weight)) if weight.sum() > 0 else float(ptot.mean())
    p0c = float(p0c)
    if not (np.isfinite(p0c) and p0c > 0):
        raise ValueError(f"p0c must be a positive momentum in eV, got {p0c}")
    beta = ptot / np.sqrt(ptot**2 + spec.mass_eV**2)
    z_varies, t_varies = bool(np.ptp(z) > 0), bool(np.ptp(t) > 0)
    z0 = (z.mean() if z_ref is None else float(z_ref)) if z_varies else z[0]
    t0 = (t.mean() if t_ref is None else float(t_ref)) if t_varies else t[0]
    z_bmad = (z - z0) - beta * SPEED_OF_LIGHT * (t - t0)
    particles = np.stack([x, mx / p0c, y, my / p0c, z_bmad, ptot / p0c - 1], axis=-1)
    return OpenPMDBeam(particles, p0c, spec.name, charge, weight)
