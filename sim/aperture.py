"""Apertures: thin elements that remove particles, carried as per-particle survival weights."""

import torch

from .element import Element, may_be_nonzero
from .tracking import per_particle

SHAPES = ("rectangular", "elliptical")
_OPEN = ("x_max", "y_max")  # may be +inf (open in that plane)


class Aperture(Element):
    """A thin aperture (no length) that removes the particles outside its opening from everything
    downstream (screens, the final beam and its moments).

    shape "rectangular": a particle survives when |x - x_offset| < x_max and |y - y_offset| < y_max;
    "elliptical": when ((x - x_offset)/x_max)^2 + ((y - y_offset)/y_max)^2 <= 1 (Cheetah's Aperture,
    which has no offsets, uses the same tests). x_max, y_max [m]: half widths of the opening, > 0
    (inf, the default: open in that plane). x_offset, y_offset [m]: centre of the opening. One
    straight edge at x = e is a rectangle with a wide x_max (say 1 m) and x_offset = e - x_max (keeps
    x < e) or e + x_max (keeps x > e).

    edge [m]: 0 (default) cuts hard: survival is exactly 0 or 1, with no gradient with respect to
    the aperture or the particles' positions. edge > 0: survival sigmoid(d / edge) with d the signed
    distance to the edge [m] (positive inside): rectangular, a product of one sigmoid per side;
    elliptical, d to first order, (1 - r^2) / |grad r^2| with r^2 the left side of the test above.
    A fit can then move the aperture (and the particles near it) by gradients.

    Lost particles keep their coordinates: the lattice multiplies their weights (..., N) by the
    survival, so shapes and broadcasting over settings (..., N, 6) stay as they are.
    """

    parameters_defaults = {"x_max": float("inf"), "y_max": float("inf"), "x_offset": 0.0, "y_offset": 0.0,
                           "edge": 0.0}
    non_negative = ("edge",)

    def __init__(self, name=None, shape: str = "rectangular", **values):
        for key in _OPEN:  # JSON writes inf as Infinity, which YAML readers return as a string
            if isinstance(values.get(key), str) and values[key].strip().lower() in ("inf", "+inf", "infinity"):
                values[key] = float("inf")
        super().__init__(name, **values)
        if shape not in SHAPES:
            raise ValueError(f"Aperture {self.name}: unknown shape {shape!r}; use one of {SHAPES}")
        self.shape = shape

    def _check(self, key: str, value: torch.Tensor) -> None:
        if key in _OPEN:
            if torch.isnan(value).any() or (value <= 0).any():
                raise ValueError(f"Aperture {self.name}: {key} must be > 0 [m] (inf: open), got {value.tolist()}")
            return
        super()._check(key, value)

    def to_dict(self) -> dict:
        entry = super().to_dict()
        entry["shape"] = self.shape
        return entry

    def _hard(self, x: torch.Tensor, y: torch.Tensor, p: dict) -> torch.Tensor:
        """0/1 survival (..., N), without gradients (partly in place: it is most of an aperture's cost)."""
        with torch.no_grad():
            u = x - per_particle(p["x_offset"])
            v = y - per_particle(p["y_offset"])
            a, b = per_particle(p["x_max"]), per_particle(p["y_max"])
            if self.shape == "rectangular":
                return ((u.abs_() < a) & (v.abs_() < b)).to(x.dtype)
            return (u.square_() / a.square() + v.square_() / b.square() <= 1).to(x.dtype)  # as Cheetah's

    def survival(self, x: torch.Tensor, y: torch.Tensor, overrides: dict | None = None) -> torch.Tensor:
        """Survival in [0, 1] (..., N) of particles at x, y (..., N) [m]; parameters broadcast over settings."""
        p = self.parameter_values(overrides, x)
        edge = p["edge"]
        if not may_be_nonzero(edge):
            return self._hard(x, y, p)
        hard = None if bool((edge > 0).all()) else self._hard(x, y, p)
        u = x - per_particle(p["x_offset"])
        v = y - per_particle(p["y_offset"])
        a, b = per_particle(p["x_max"]), per_particle(p["y_max"])
        edge = per_particle(edge)
        inv_width = 1 / torch.where(edge > 0, edge, torch.ones_like(edge))  # per setting: multiply per particle
        if self.shape == "rectangular":
            soft = _between(u, a, inv_width) * _between(v, b, inv_width)
        else:
            ia, ib = 1 / a, 1 / b
            su, sv = u * ia, v * ib
            # 1 / |grad r^2| with a floor (1e-9 of the inverse half width) at the centre
            floor = 1e-9 / torch.minimum(torch.minimum(a, b), torch.ones_like(a))
            inv_gradient = torch.rsqrt((su * ia).square() + (sv * ib).square() + floor.square())
            soft = torch.sigmoid((1 - su.square() - sv.square()) * inv_gradient * (0.5 * inv_width))
        return soft if hard is None else torch.where(edge > 0, soft, hard)


def _between(u: torch.Tensor, half: torch.Tensor, inv_width: torch.Tensor) -> torch.Tensor:
    """sigmoid((half - u) / width) * sigmoid((half + u) / width); 1 (and no NaN gradients) where half is inf."""
    open_ = torch.isinf(half)
    if not bool(open_.any()):
        return torch.sigmoid((half - u) * inv_width) * torch.sigmoid((half + u) * inv_width)
    half = torch.where(open_, torch.zeros_like(half), half)
    pair = torch.sigmoid((half - u) * inv_width) * torch.sigmoid((half + u) * inv_width)
    return torch.where(open_, torch.ones_like(pair), pair)
