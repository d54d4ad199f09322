"""How a machine differs from its lattice model: scale and offset corrections of settings and element
parameters (DESIGN.md, "Calibration").

An entry `{"Q1.k1": {kind: scale, init: 1.0}}` multiplies the value of Q1.k1 (the scanned column, or the
parameter stored in the lattice when it is not scanned) by a factor; `kind: offset` adds to it. A value
is one number for the whole parameter, or one per component (the parameter's own shape, e.g. two for a
screen's `center` (x, y) [m]).
"""

from dataclasses import dataclass

import numpy as np
import torch

import sim
from sim.lattice import parse_setting_name

KINDS = ("scale", "offset")
# parameters that are positions [m]: their offsets' default step (the unit the fit moves them in)
POSITION_PARAMETERS = ("x_offset", "y_offset", "center")
POSITION_STEP = 1e-3  # m
SCALE_STEP = 0.1
OFFSET_STEP_FRACTION = 0.05  # of the largest |value| of another parameter (1 where it is always 0)


@dataclass
class Correction:
    """One calibrated setting or parameter `name` ("<element>.<parameter>").

    value0: the starting (or, for a simulated machine, the true) value, shape () or `shape`;
    prior_sigma: the Gaussian prior's width (None: no prior); step: the change in value the fit makes per
    unit of its internal parameter (Adam moves that by ~lr per step); scanned: a column of the scan.
    """

    name: str
    kind: str
    value0: np.ndarray
    shape: tuple
    scanned: bool
    prior_sigma: np.ndarray | None = None
    step: np.ndarray | None = None

    def apply(self, base: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """The calibrated value of `base` (the scanned column (B,) or the stored parameter)."""
        return base * value if self.kind == "scale" else base + value


def _array(value, what: str) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number or a list of numbers, got {value!r}") from None
    if not np.isfinite(array).all():
        raise ValueError(f"{what} must be finite, got {value!r}")
    return array


def parse_corrections(spec, lattice: sim.Lattice, setting_names, where: str = "model.calibrate",
                      value_key: str = "init", extra_keys: tuple = ("prior_sigma", "step"),
                      settings: np.ndarray | None = None) -> list[Correction]:
    """Check a calibration mapping against the lattice and the scan's setting names; one clear error per
    problem (unknown element or parameter, unknown kind, unknown key, a shape that does not match)."""
    if spec is None:
        return []
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must be a mapping from '<element>.<parameter>' to "
                         f"{{kind: scale | offset, {value_key}: ...}}, got {spec!r}")
    elements = {e.name: e for e in lattice.elements}
    setting_names = list(setting_names)
    corrections = []
    for name, entry in spec.items():
        here = f"{where}[{name!r}]"
        element, parameter = parse_setting_name(name)
        if element not in elements:
            raise ValueError(f"{here}: no element named {element!r} in the lattice; elements: {sorted(elements)}")
        if parameter not in elements[element].parameters_defaults:
            raise ValueError(f"{here}: {type(elements[element]).__name__} {element} has no parameter {parameter!r}; "
                             f"known: {sorted(elements[element].parameters_defaults)}")
        if not isinstance(entry, dict):
            raise ValueError(f"{here} must be a mapping {{kind: scale | offset, {value_key}: ...}}, got {entry!r}")
        unknown = set(entry) - {"kind", value_key, *extra_keys}
        if unknown:
            raise ValueError(f"{here}: unknown key(s) {sorted(unknown)}; known: {['kind', value_key, *extra_keys]}")
        kind = entry.get("kind")
        if kind not in KINDS:
            raise ValueError(f"{here}: unknown kind {kind!r}; use one of {list(KINDS)}")
        scanned = name in setting_names
        shape = () if scanned else tuple(getattr(elements[element], parameter).shape)
        default = 1.0 if kind == "scale" else np.zeros(shape)
        value0 = _array(entry.get(value_key, default), f"{here}.{value_key}")
        if value0.shape not in ((), shape):
            raise ValueError(f"{here}: {value_key} has shape {value0.shape}, but {name} has shape {shape}"
                             + (" (a scanned setting: one value per setting)" if scanned else "")
                             + "; give one number or one per component")
        corrections.append(Correction(name, kind, value0, shape, scanned))
        for key in extra_keys:
            if entry.get(key) is None:
                continue
            array = _array(entry[key], f"{here}.{key}")
            if array.shape not in ((), value0.shape) or not (array > 0).all():
                raise ValueError(f"{here}: {key} must be positive, one number or one per component of "
                                 f"{value_key} (shape {value0.shape}), got {entry[key]!r}")
            setattr(corrections[-1], key, np.broadcast_to(array, value0.shape).copy())
        if "step" in extra_keys and corrections[-1].step is None:
            corrections[-1].step = np.full(value0.shape, _default_step(corrections[-1], parameter, elements[element],
                                                                        setting_names, settings))
    return corrections


def _default_step(correction: Correction, parameter: str, element, setting_names, settings) -> float:
    """The fit's unit of change: the prior's width where given; 0.1 for a scale; 1 mm for a position
    offset; otherwise 5 % of the parameter's largest |value| (scanned or stored)."""
    if correction.prior_sigma is not None:
        return float(np.max(correction.prior_sigma))
    if correction.kind == "scale":
        return SCALE_STEP
    if parameter in POSITION_PARAMETERS:
        return POSITION_STEP
    if correction.scanned and settings is not None:
        largest = float(np.max(np.abs(settings[:, list(setting_names).index(correction.name)])))
    else:
        largest = float(getattr(element, parameter).detach().abs().max())
    return OFFSET_STEP_FRACTION * largest if largest > 0 else 1.0


def apply_corrections(values: dict[str, torch.Tensor], lattice: sim.Lattice, corrections: list[Correction],
                      corrected: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Lattice settings {name: tensor} with each correction applied (value `corrected[i]`): a scanned
    setting's column is corrected, any other parameter is read from the lattice, corrected and added."""
    if not corrections:
        return values
    values = dict(values)
    like = next(iter(values.values())) if values else corrected[0]
    for correction, value in zip(corrections, corrected):
        if correction.name in values:
            base = values[correction.name]
        else:
            element, parameter = parse_setting_name(correction.name)
            base = getattr(lattice[element], parameter).to(dtype=like.dtype, device=like.device)
        values[correction.name] = correction.apply(base, value.to(dtype=like.dtype, device=like.device))
    return values
