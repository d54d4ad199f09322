"""Import a lattice from a `cheetah.Segment` (Cheetah 0.8). Cheetah is not imported here: elements
are read by class name and attributes, so sim keeps torch as its only dependency.

Conversions: Dipole and RBend -> Dipole (Cheetah's dipole_e1/e2 are the sector-bend edge angles);
Solenoid k -> ks = 2 k; TransverseDeflectingCavity phase [turns] -> [rad]; Cavity phase [deg] ->
[rad] (an RFCavity without Cheetah's transverse RF focusing); misalignment (dx, dy) ->
x_offset, y_offset; tracking_method drift_kick_drift -> Quadrupole "chromatic", others
"kick_drift"; Sextupole second_order -> "kick_drift"; Screen binning folded into resolution and
pixel size, misalignment -> center; Aperture (x_max, y_max, shape) -> Aperture (an inactive one is
dropped). Marker and BPM are dropped (they do not change the beam).
"""

import math
import warnings

import torch

from .aperture import Aperture
from .bends import Dipole
from .cavities import RFCavity, TransverseDeflectingCavity
from .element import Element
from .magnets import Drift, Quadrupole, Sextupole, Solenoid
from .screen import Screen

_DROPPED = ("Marker", "BPM")


def _value(tensor) -> torch.Tensor:
    return torch.as_tensor(tensor).detach().clone().to(torch.float64)


def _offsets(element) -> dict:
    misalignment = _value(element.misalignment)
    return {"x_offset": misalignment[..., 0], "y_offset": misalignment[..., 1]}


def _tracking(element, mapping: dict) -> str:
    method = getattr(element, "tracking_method", "linear")
    if method not in mapping:
        raise ValueError(f"cheetah {type(element).__name__} {element.name}: tracking_method {method!r} has no "
                         f"psr equivalent; supported: {sorted(mapping)}")
    return mapping[method]


def _convert(element) -> Element | None:
    kind, name = type(element).__name__, element.name
    if kind in _DROPPED:
        return None
    if kind == "Drift":
        return Drift(name, length=_value(element.length),
                     tracking=_tracking(element, {"linear": "linear", "second_order": "kick_drift",
                                                  "drift_kick_drift": "kick_drift"}))
    if kind == "Quadrupole":
        return Quadrupole(name, length=_value(element.length), k1=_value(element.k1), tilt=_value(element.tilt),
                          **_offsets(element), num_steps=int(getattr(element, "num_steps", 1)),
                          tracking=_tracking(element, {"linear": "linear", "second_order": "chromatic",
                                                       "drift_kick_drift": "chromatic"}))
    if kind in ("Dipole", "RBend"):
        if not (torch.equal(_value(element.fringe_integral), _value(element.fringe_integral_exit))
                and torch.equal(_value(element.gap), _value(element.gap_exit))):
            raise ValueError(f"cheetah {kind} {name}: different entrance and exit fringe fields are not supported")
        return Dipole(name, length=_value(element.length), angle=_value(element.angle), k1=_value(element.k1),
                      e1=_value(element.dipole_e1), e2=_value(element.dipole_e2), tilt=_value(element.tilt),
                      fringe_integral=_value(element.fringe_integral), gap=_value(element.gap),
                      tracking=_tracking(element, {"linear": "linear", "drift_kick_drift": "kick_drift"}))
    if kind == "Solenoid":
        return Solenoid(name, length=_value(element.length), ks=2 * _value(element.k), **_offsets(element))
    if kind == "Sextupole":
        return Sextupole(name, length=_value(element.length), k2=_value(element.k2), tilt=_value(element.tilt),
                         **_offsets(element),
                         tracking=_tracking(element, {"linear": "linear", "second_order": "kick_drift"}))
    if kind == "TransverseDeflectingCavity":
        return TransverseDeflectingCavity(
            name, length=_value(element.length), voltage=_value(element.voltage),
            frequency=_value(element.frequency), phase=2 * math.pi * _value(element.phase),
            tilt=_value(element.tilt), **_offsets(element), num_steps=int(element.num_steps))
    if kind == "Cavity":
        warnings.warn(f"cheetah Cavity {name}: imported as an RFCavity without transverse RF focusing", stacklevel=3)
        return RFCavity(name, length=_value(element.length), voltage=_value(element.voltage),
                        frequency=_value(element.frequency), phase=torch.deg2rad(_value(element.phase)))
    if kind == "Aperture":
        if not element.is_active:
            return None
        return Aperture(name, shape=element.shape, x_max=_value(element.x_max), y_max=_value(element.y_max))
    if kind == "Screen":
        binning = int(element.binning)
        width, height = (int(n) // binning for n in element.resolution)
        method = {"cloud-in-cell": "cic", "histogram": "cic", "kde": "kde"}[element.method]
        return Screen(name, resolution=(width, height), pixel_size=_value(element.pixel_size) * binning,
                      center=_value(element.misalignment), method=method)
    raise ValueError(f"cheetah {kind} {name}: no psr equivalent; psr imports Drift, Quadrupole, Dipole, RBend, "
                     f"Solenoid, Sextupole, TransverseDeflectingCavity, Cavity, Screen, Aperture, Marker, BPM")


def elements_from_cheetah(segment) -> list[Element]:
    """psr elements for the elements of a cheetah Segment (nested segments flattened)."""
    out = []
    for element in segment.elements:
        if type(element).__name__ == "Segment":
            out.extend(elements_from_cheetah(element))
            continue
        converted = _convert(element)
        if converted is not None:
            out.append(converted)
    return out
