"""Lattices of psr's files: sim's elements plus the neural elements of models/ (DESIGN.md "Neural elements").

A neural element's `weights` file is relative to the folder of the file that holds the lattice (a lattice
file, or a scan or pairs file).
"""

import functools
import os
from pathlib import Path

import sim
from models.corrected import CorrectedSection
from models.elements import NEURAL_ELEMENT_TYPES, element_types


def build_lattice(items: list[dict], base_dir=None, space_charge=None) -> sim.Lattice:
    """`sim.Lattice.from_list` that also knows the neural element types (weights relative to base_dir) and
    `CorrectedSection` (a surrogate corrected by its physics, `model.replace`'s `correct`)."""
    types = {**element_types(base_dir),
             "CorrectedSection": functools.partial(CorrectedSection, base_dir=None if base_dir is None else str(base_dir))}
    return sim.Lattice.from_list(items, space_charge=space_charge, element_types=types)


def rebase_weights(items: list[dict], from_dir, to_dir) -> list[dict]:
    """Lattice entries whose neural elements' relative weights paths, written for files in `from_dir`, are
    rewritten for a file in `to_dir`."""
    out = []
    for item in items:
        item = dict(item)
        weights = item.get("weights")
        if item.get("type") in NEURAL_ELEMENT_TYPES and weights and not Path(weights).is_absolute():
            item["weights"] = os.path.relpath(Path(from_dir) / weights, Path(to_dir))
        out.append(item)
    return out
