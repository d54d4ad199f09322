"""Base class of lattice elements: named tensor parameters that broadcast over settings."""

import torch
from torch import nn

from .species import relativistic_factors
from .tracking import per_particle, stack, to_element_frame, to_lab_frame


class Element(nn.Module):
    """A lattice element with named parameters.

    Subclasses list their parameters and defaults in `parameters` (name -> default). Each parameter
    is a tensor of any shape (its shape is the settings shape it contributes); an `nn.Parameter`
    given to the constructor stays trainable. `overrides` passed at tracking time replace stored
    values (that is how scan settings enter).
    """

    parameters_defaults: dict[str, object] = {}
    non_negative: tuple[str, ...] = ("length",)
    tracking_methods: tuple[str, ...] = ()  # how particles can be tracked; the first is the default

    def __init__(self, name: str | None = None, tracking: str | None = None, num_steps: int = 1, **values):
        super().__init__()
        self.name = name or type(self).__name__
        if tracking is not None and tracking not in self.tracking_methods:
            known = ", ".join(self.tracking_methods) or "none (it does not track particles)"
            raise ValueError(f"{type(self).__name__} {self.name}: unknown tracking {tracking!r}; known: {known}")
        self.tracking = tracking or (self.tracking_methods[0] if self.tracking_methods else None)
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"{type(self).__name__} {self.name}: num_steps must be a positive integer, got {num_steps!r}")
        self.num_steps = num_steps
        unknown = set(values) - set(self.parameters_defaults)
        if unknown:
            raise ValueError(
                f"{type(self).__name__} {self.name}: unknown parameter(s) {sorted(unknown)}; "
                f"known: {sorted(self.parameters_defaults)}"
            )
        for key, default in self.parameters_defaults.items():
            value = values.get(key, default)
            if isinstance(value, nn.Parameter):
                self.register_parameter(key, value)
            else:
                if not torch.is_tensor(value):
                    try:
                        value = torch.as_tensor(value, dtype=torch.float64)
                    except (TypeError, ValueError, RuntimeError):
                        raise ValueError(
                            f"{type(self).__name__} {self.name}: {key} must be a number or a list of numbers, "
                            f"got {value!r}"
                        ) from None
                if not value.is_floating_point():
                    value = value.to(torch.float64)
                self.register_buffer(key, value)
            self._check(key, getattr(self, key))

    def _check(self, key: str, value: torch.Tensor) -> None:
        if not torch.isfinite(value).all():
            raise ValueError(f"{type(self).__name__} {self.name}: {key} must be finite, got {value}")
        if key in self.non_negative and (value < 0).any():
            raise ValueError(f"{type(self).__name__} {self.name}: {key} must be >= 0, got {value.tolist()}")

    def parameter_values(self, overrides: dict | None, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """All parameters as tensors of `like`'s dtype and device, with `overrides` applied."""
        overrides = overrides or {}
        unknown = set(overrides) - set(self.parameters_defaults)
        if unknown:
            raise KeyError(
                f"{self.name} has no parameter(s) {sorted(unknown)}; known: {sorted(self.parameters_defaults)}"
            )
        out = {}
        for key in self.parameters_defaults:
            value = overrides[key] if key in overrides else getattr(self, key)
            out[key] = torch.as_tensor(value).to(dtype=like.dtype, device=like.device)
        return out

    sliced_parameters: tuple[str, ...] = ("length",)  # integrated over the length: scaled in a slice

    def slice_overrides(self, overrides: dict | None, like: torch.Tensor, fraction: float,
                        entrance: bool, exit: bool) -> dict[str, torch.Tensor]:
        """Parameters of a slice holding `fraction` of the element (space-charge slicing); `entrance`,
        `exit`: whether the slice holds the element's entrance or exit face (edge effects)."""
        p = self.parameter_values(overrides, like)
        return {k: v * fraction if k in self.sliced_parameters else v for k, v in p.items()}

    def to_dict(self) -> dict:
        """The lattice-file entry of this element."""
        entry = {"type": type(self).__name__, "name": self.name}
        if self.tracking_methods and self.tracking != self.tracking_methods[0]:
            entry["tracking"] = self.tracking
        if self.num_steps != 1:
            entry["num_steps"] = self.num_steps
        for key in self.parameters_defaults:
            value = getattr(self, key).detach().cpu()
            entry[key] = value.item() if value.ndim == 0 else value.tolist()
        return entry

    def track(self, particles: torch.Tensor, p0c, species, overrides: dict | None = None):
        """Track particles (..., N, 6) through the element: returns (particles, p0c after it [eV])."""
        raise NotImplementedError(f"{type(self).__name__} {self.name} does not track particles")

    def extra_repr(self) -> str:
        return f"name={self.name!r}" + (f", tracking={self.tracking!r}" if self.tracking else "")


class LinearElement(Element):
    """An element with a 6x6 transfer matrix (`tracking="linear"`) and, where listed in
    `tracking_methods`, particle-by-particle methods implemented in `track_body` (element frame).

    Elements with `x_offset`, `y_offset` [m] (and `tilt` [rad]) parameters are misaligned by them:
    particles enter the element frame (offsets subtracted, then rotated by the tilt) and leave it.
    """

    tracking_methods = ("linear",)
    affine = False  # True: the linear method adds a zeroth-order term (done in track_body)

    def transfer_map(self, p0c, species, like: torch.Tensor, overrides: dict | None = None) -> torch.Tensor:
        """Transfer matrix (..., 6, 6) in Bmad coordinates, tilt included; `...` is the settings shape."""
        raise NotImplementedError

    def track_body(self, coords: tuple, p: dict, p0c, species) -> tuple:
        """Nonlinear tracking of coords (x, px, y, py, z, pz) in the element frame (`self.tracking`)."""
        raise NotImplementedError

    def offsets(self, p: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(x_offset, y_offset) when the element has them and they may be non-zero, else None."""
        if "x_offset" not in p:
            return None
        dx, dy = p["x_offset"], p["y_offset"]
        return (dx, dy) if may_be_nonzero(dx, dy) else None

    def is_matrix(self, overrides: dict | None, like: torch.Tensor) -> bool:
        """True when the element acts on the beam as its transfer matrix alone (linear and aligned)."""
        if self.tracking != "linear" or self.affine:
            return False
        return self.offsets(self.parameter_values(overrides, like)) is None

    def track(self, particles, p0c, species, overrides=None):
        p = self.parameter_values(overrides, particles)
        offsets = self.offsets(p)
        if self.tracking == "linear" and not self.affine:
            m = self.transfer_map(p0c, species, particles, overrides)
            if offsets is None:
                return particles @ m.transpose(-1, -2), p0c
            shift = torch.stack(torch.broadcast_tensors(offsets[0], torch.zeros_like(offsets[0]), offsets[1]), -1)
            shift = torch.nn.functional.pad(shift, (0, 3)).unsqueeze(-2)  # (..., 1, 6)
            return (particles - shift) @ m.transpose(-1, -2) + shift, p0c
        zero = torch.zeros((), dtype=particles.dtype, device=particles.device)
        tilt = p.get("tilt", zero)
        if offsets is None and not may_be_nonzero(tilt):
            return stack(self.track_body(particles.unbind(-1), p, p0c, species)), p0c  # aligned: no frame change
        dx, dy = offsets if offsets is not None else (zero, zero)
        frame = per_particle(dx), per_particle(dy), per_particle(tilt)
        coords = to_element_frame(particles.unbind(-1), *frame)
        coords = self.track_body(coords, p, p0c, species)
        return stack(to_lab_frame(coords, *frame)), p0c


def may_be_nonzero(*values: torch.Tensor) -> bool:
    """True when any value is non-zero or requires grad (so it must enter the computation)."""
    return any(v.requires_grad or bool((v != 0).any()) for v in values)


def eye_like(shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """Identity matrices (*shape, 6, 6) in `like`'s dtype and device."""
    return torch.eye(6, dtype=like.dtype, device=like.device).expand(*shape, 6, 6).clone()


def lorentz_gamma(p0c, species, like: torch.Tensor) -> torch.Tensor:
    """Lorentz factor of the reference particle as a tensor of `like`'s dtype; p0c [eV] may be a
    settings tensor (...) (after an RF cavity whose voltage is scanned)."""
    gamma, _ = relativistic_factors(torch.as_tensor(p0c, dtype=like.dtype, device=like.device), species)
    return gamma
