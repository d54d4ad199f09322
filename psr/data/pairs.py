"""Surrogate training data (DESIGN.md "Surrogate training data", contract): HDF5 `pairs` files.

    /            attrs psr_format = "pairs", psr_version = 1, p0c [eV], species, charge [C]
    /lattice     attr yaml: the section the surrogate replaces
    /settings    float64 (M, P), attr names (P strings "<element>.<parameter>" of the section)
    /beams_in    float32 (M, N, 6): M input beams (Bmad coordinates)
    /beams_out   float32 (M, N, 6): what the reference physics made of them
"""

from dataclasses import dataclass, field, replace
from pathlib import Path

import h5py
import numpy as np
import yaml

from psr.data.atomic import atomic_target
from sim.lattice import load_lattice_text


@dataclass
class PairsData:
    lattice: list[dict]
    settings: np.ndarray  # (M, P)
    setting_names: list[str]
    beams_in: np.ndarray  # (M, N, 6)
    beams_out: np.ndarray  # (M, N, 6)
    p0c: float
    species: str = "electron"
    charge: float = 0.0
    provenance: dict[str, str] = field(default_factory=dict)


def check_pairs(pairs: PairsData, source: str) -> None:
    """One clear error naming the first inconsistency (shapes of beams, settings and names)."""
    beams_in, beams_out, settings = pairs.beams_in, pairs.beams_out, pairs.settings
    if beams_in.ndim != 3 or beams_in.shape[-1] != 6:
        raise ValueError(f"{source}: /beams_in must be (M, N, 6), got {beams_in.shape}")
    if beams_out.shape != beams_in.shape:
        raise ValueError(f"{source}: /beams_out has shape {beams_out.shape}, /beams_in {beams_in.shape}: "
                         "each input beam needs its output beam, particle by particle")
    if settings.ndim != 2 or settings.shape[0] != beams_in.shape[0]:
        raise ValueError(f"{source}: /settings has shape {settings.shape}, but the file holds {beams_in.shape[0]} "
                         "beams: one row of settings per beam")
    if len(pairs.setting_names) != settings.shape[1]:
        raise ValueError(f"{source}: /settings names {list(pairs.setting_names)} ({len(pairs.setting_names)}) do not "
                         f"match its {settings.shape[1]} columns")
    for name, array in (("beams_in", beams_in), ("beams_out", beams_out), ("settings", settings)):
        if not np.isfinite(array).all():
            raise ValueError(f"{source}: /{name} holds NaN or infinite values")
    if not pairs.p0c > 0:
        raise ValueError(f"{source}: p0c must be positive, got {pairs.p0c}")


def write_pairs(path, pairs: PairsData) -> Path:
    check_pairs(pairs, str(path))
    path = Path(path)
    with atomic_target(path) as tmp, h5py.File(tmp, "w-") as handle:
        handle.attrs.update(psr_format="pairs", psr_version=1, p0c=float(pairs.p0c), species=pairs.species,
                            charge=float(pairs.charge))
        handle.create_group("lattice").attrs["yaml"] = yaml.safe_dump(pairs.lattice, sort_keys=False)
        settings = handle.create_dataset("settings", data=np.asarray(pairs.settings, dtype=np.float64))
        settings.attrs["names"] = list(pairs.setting_names)
        for name in ("beams_in", "beams_out"):
            handle.create_dataset(name, data=np.asarray(getattr(pairs, name), dtype=np.float32), compression="gzip",
                                  compression_opts=4, shuffle=True)
        if pairs.provenance:
            handle.create_group("provenance").attrs.update(pairs.provenance)
    return path


def read_pairs(path) -> PairsData:
    """Read and check a pairs file; one clear error for a missing file, another format or inconsistent data."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: " + ("is a folder" if path.is_dir() else "no such file"))
    try:
        handle = h5py.File(path, "r")
    except OSError:
        raise ValueError(f"{path}: not an HDF5 file") from None
    with handle:
        if handle.attrs.get("psr_format") != "pairs":
            raise ValueError(f"{path}: psr_format is {handle.attrs.get('psr_format')!r}, not 'pairs'")
        if int(handle.attrs.get("psr_version", -1)) != 1:
            raise ValueError(f"{path}: psr_version {handle.attrs.get('psr_version')} (this psr reads version 1)")
        for needed in ("lattice", "settings", "beams_in", "beams_out"):
            if needed not in handle:
                raise ValueError(f"{path}: /{needed} missing")
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in handle["settings"].attrs.get("names", [])]
        pairs = PairsData(
            lattice=load_lattice_text(str(handle["lattice"].attrs["yaml"]), f"{path}:/lattice"),
            settings=np.asarray(handle["settings"][()], dtype=np.float64), setting_names=names,
            beams_in=handle["beams_in"][()], beams_out=handle["beams_out"][()], p0c=float(handle.attrs["p0c"]),
            species=str(handle.attrs.get("species", "electron")), charge=float(handle.attrs.get("charge", 0.0)))
    check_pairs(pairs, str(path))
    return pairs


def read_pairs_files(paths: str | list[str]) -> tuple[PairsData, list[tuple[int, int]]]:
    """One pairs file, or several of the same section, settings, p0c, species, charge and particle count
    concatenated, and each file's (first beam, beam count)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise ValueError("data.path: give a pairs file or a list of them")
    first = read_pairs(paths[0])
    all_pairs = [first]
    for path in paths[1:]:
        pairs = read_pairs(path)
        for what, mine, theirs in (("section (/lattice)", pairs.lattice, first.lattice),
                                   ("setting names", pairs.setting_names, first.setting_names),
                                   ("p0c", pairs.p0c, first.p0c), ("species", pairs.species, first.species),
                                   ("charge", pairs.charge, first.charge),
                                   ("particles per beam", pairs.beams_in.shape[1], first.beams_in.shape[1])):
            if mine != theirs:
                raise ValueError(f"{path}: its {what} ({mine!r}) differs from {paths[0]}'s ({theirs!r}): files "
                                 "trained together must describe one section and bunch")
        all_pairs.append(pairs)
    counts = [pairs.beams_in.shape[0] for pairs in all_pairs]
    parts = [(int(start), count) for start, count in zip(np.cumsum([0, *counts[:-1]]), counts)]
    out = replace(first, settings=np.concatenate([p.settings for p in all_pairs]),
                  beams_in=np.concatenate([p.beams_in for p in all_pairs]),
                  beams_out=np.concatenate([p.beams_out for p in all_pairs]))
    return out, parts
