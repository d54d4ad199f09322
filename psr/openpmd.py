"""openPMD-beamphysics particle files (h5py only), converted to and from Bmad coordinates."""

import os
import tempfile
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np

from sim.species import SPEED_OF_LIGHT, get_species

_UNITS = {  # record -> (unitSI, unitDimension (L, M, T, I, theta, N, J), unitSymbol)
    "position": (1.0, (1, 0, 0, 0, 0, 0, 0), "m"),
    "momentum": (5.344285992678308e-28, (1, 1, -1, 0, 0, 0, 0), "eV/c"),
    "time": (1.0, (0, 0, 1, 0, 0, 0, 0), "s"),
    "weight": (1.0, (0, 0, 1, 1, 0, 0, 0), "C"),
    "particleStatus": (1.0, (0, 0, 0, 0, 0, 0, 0), "1"),
}


class OpenPMDBeam(NamedTuple):
    """Particles (N, 6) float64 in Bmad coordinates, reference momentum p0c [eV], species, charge [C]."""

    particles: np.ndarray
    p0c: float
    species: str
    charge: float


def _write_component(group: h5py.Group, name: str, data: np.ndarray, record: str) -> None:
    unit_si, dimension, symbol = _UNITS[record]
    if data.size and np.all(data == data.flat[0]):
        node = group.create_group(name)
        node.attrs["value"] = data.flat[0]
        node.attrs["shape"] = np.asarray(data.shape)
    else:
        group[name] = data
        node = group[name]
    node.attrs["unitSI"] = unit_si
    node.attrs["unitDimension"] = np.asarray(dimension, dtype=np.float64)
    node.attrs["unitSymbol"] = symbol


def write_bunch(group: h5py.Group, particles, p0c: float, species: str = "electron", charge: float = 0.0) -> None:
    """Write a bunch under group/<species>/ (openPMD-beamphysics layout), from Bmad coordinates at fixed s.

    Px = px p0c, Py = py p0c, P = (1 + pz) p0c, Pz = sqrt(P^2 - Px^2 - Py^2) [eV/c]; position z = 0;
    t = -z_bmad / (beta c) with beta each particle's own speed; weight = charge / N [C].
    """
    spec = get_species(species)
    p = np.asarray(particles, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 6:
        raise ValueError(f"particles must have shape (N, 6), got {p.shape}")
    if not np.isfinite(p).all():
        raise ValueError("particles contain NaN or infinite coordinates")
    n = p.shape[0]
    px, py, ptot = p[:, 1] * p0c, p[:, 3] * p0c, (1 + p[:, 5]) * p0c
    pz2 = ptot**2 - px**2 - py**2
    if (pz2 <= 0).any():
        raise ValueError("some particles have transverse momentum above their total momentum")
    beta = ptot / np.sqrt(ptot**2 + spec.mass_eV**2)
    bunch = group.create_group(spec.name)
    bunch.attrs["speciesType"] = np.bytes_(spec.name)
    bunch.attrs["numParticles"] = np.int64(n)
    bunch.attrs["totalCharge"] = float(charge)
    bunch.attrs["chargeUnitSI"] = 1.0
    components = {
        "position/x": (p[:, 0], "position"), "position/y": (p[:, 2], "position"),
        "position/z": (np.zeros(n), "position"),
        "momentum/x": (px, "momentum"), "momentum/y": (py, "momentum"), "momentum/z": (np.sqrt(pz2), "momentum"),
        "time": (-p[:, 4] / (beta * SPEED_OF_LIGHT), "time"),
        "weight": (np.full(n, charge / n), "weight"),
        "particleStatus": (np.ones(n, dtype=np.int64), "particleStatus"),
    }
    for name, (data, record) in components.items():
        _write_component(bunch, name, data, record)


def write_openpmd(target, particles, p0c: float, species: str = "electron", charge: float = 0.0) -> None:
    """Write a beam to a new openPMD file (path) or into an open h5py group.

    A path gets the root attributes of an openPMD-beamphysics file and the bunch under
    /particles/<species>/; the file is written to a temporary name and renamed, so a failure
    leaves no partial file.
    """
    if isinstance(target, h5py.Group):
        write_bunch(target, particles, p0c, species, charge)
        return
    path = Path(target)
    fd, tmp = tempfile.mkstemp(suffix=".h5.tmp", dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    _umask = os.umask(0)
    os.umask(_umask)
    os.chmod(tmp, 0o666 & ~_umask)
    try:
        with h5py.File(tmp, "w") as handle:
            for key, value in {"basePath": "/", "dataType": "openPMD", "openPMD": "2.0.0",
                               "openPMDextension": "BeamPhysics;SpeciesType", "particlesPath": "particles"}.items():
                handle.attrs[key] = np.bytes_(value)
            write_bunch(handle.create_group("particles"), particles, p0c, species, charge)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _component(group: h5py.Group, name: str) -> np.ndarray:
    if name not in group:
        raise ValueError(f"{group.name}: openPMD component {name!r} missing")
    node = group[name]
    if isinstance(node, h5py.Group):
        if "value" not in node.attrs or "shape" not in node.attrs:
            raise ValueError(f"{node.name}: constant component without 'value' and 'shape' attributes")
        data = np.full(tuple(np.atleast_1d(node.attrs["shape"])), node.attrs["value"], dtype=np.float64)
    else:
        data = node[()].astype(np.float64)
    return data * float(node.attrs.get("unitSI", 1.0))


def _find_bunch(group: h5py.Group) -> h5py.Group:
    """The species group holding position/momentum records, searched from a file root or particles group."""
    if "position" in group and "momentum" in group:
        return group
    if isinstance(group, h5py.File) and "particlesPath" in group.attrs:
        base = group.attrs.get("basePath", b"/")
        base = base.decode() if isinstance(base, bytes) else str(base)
        ppath = group.attrs["particlesPath"]
        ppath = ppath.decode() if isinstance(ppath, bytes) else str(ppath)
        if "%T" not in base:
            candidate = (base.rstrip("/") + "/" + ppath.strip("./")).replace("//", "/")
            if candidate in group:
                return _find_bunch(group[candidate])
    for key in group:
        child = group[key]
        if isinstance(child, h5py.Group) and ("position" in child and "momentum" in child or key == "particles"):
            return _find_bunch(child)
    raise ValueError(f"{group.file.filename}:{group.name} holds no openPMD particle data (no position/momentum records)")


def read_openpmd(source, p0c: float | None = None) -> OpenPMDBeam:
    """Read an openPMD-beamphysics bunch (file path, file root, particles group or species group) into Bmad coordinates.

    p0c defaults to the mean total momentum. Particles at one s (z-coordinates, times vary):
    z_bmad = -beta c (t - t_ref) with t_ref the mean time. Particles at one time (t-coordinates,
    positions z vary): z_bmad = z - mean z, exact to first order for a beam that is short
    compared with the lattice.
    """
    if not isinstance(source, h5py.Group):
        with h5py.File(source, "r") as handle:
            return read_openpmd(handle, p0c)
    bunch = _find_bunch(source)
    species = bunch.attrs.get("speciesType", bunch.name.rsplit("/", 1)[-1])
    species = get_species(species.decode() if isinstance(species, bytes) else str(species)).name
    mass = get_species(species).mass_eV
    x, y, z = (_component(bunch, f"position/{c}") for c in "xyz")
    # momenta in SI (kg m/s) -> eV/c
    px, py, pz = (_component(bunch, f"momentum/{c}") / _UNITS["momentum"][0] for c in "xyz")
    t = _component(bunch, "time")
    ptot = np.sqrt(px**2 + py**2 + pz**2)
    if p0c is None:
        p0c = float(ptot.mean())
    beta = ptot / np.sqrt(ptot**2 + mass**2)
    if np.ptp(z) > 0 and np.ptp(t) == 0:
        z_bmad = z - z.mean()
    else:
        z_bmad = -beta * SPEED_OF_LIGHT * (t - t.mean())
    particles = np.stack([x, px / p0c, y, py / p0c, z_bmad, ptot / p0c - 1], axis=-1)
    if "totalCharge" in bunch.attrs:
        charge = float(bunch.attrs["totalCharge"]) * float(bunch.attrs.get("chargeUnitSI", 1.0))
    else:
        charge = float(np.abs(_component(bunch, "weight")).sum())
    return OpenPMDBeam(particles, float(p0c), species, abs(charge))
