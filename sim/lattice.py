"""Lattice: an ordered list of elements, built from lattice files, tracked with named settings."""

import json
import math
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .aperture import Aperture
from .beam import ParticleBeam
from .element import Element, LinearElement
from .bends import Dipole
from .cavities import RFCavity, TransverseDeflectingCavity
from .magnets import Drift, Quadrupole, Sextupole, Solenoid
from .screen import Screen
from .space_charge import SpaceCharge
from .space_charge_linear import LinearSpaceCharge

ELEMENT_TYPES: dict[str, type[Element]] = {
    cls.__name__: cls
    for cls in (Drift, Quadrupole, Dipole, Solenoid, Sextupole, TransverseDeflectingCavity, RFCavity, Screen,
                Aperture)
}


class TrackResult:
    """The beam at the end of the lattice and the images of every screen, by screen name.

    `beam` may be given as a function that makes it: it is then computed when first asked for
    (fitting to images never needs the (K, N, 6) particles at the end of the lattice).
    """

    def __init__(self, beam, images: dict[str, torch.Tensor]):
        self._beam = beam
        self.images = images

    @property
    def beam(self) -> ParticleBeam:
        if not isinstance(self._beam, ParticleBeam):
            self._beam = self._beam()
        return self._beam

    def __repr__(self) -> str:
        beam = self._beam if isinstance(self._beam, ParticleBeam) else "(not computed yet)"
        return f"TrackResult(beam={beam}, images={ {k: tuple(v.shape) for k, v in self.images.items()} })"


def parse_setting_name(name: str) -> tuple[str, str]:
    """Split "<element>.<parameter>" into its parts."""
    element, sep, parameter = str(name).rpartition(".")
    if not sep or not element or not parameter:
        raise ValueError(f"setting name {name!r} must look like '<element name>.<parameter>', e.g. 'Q1.k1'")
    return element, parameter


class Lattice(nn.Module):
    """A beamline. `lattice(beam, settings={"Q1.k1": k})` tracks the beam and images every screen.

    Settings broadcast: values of shape (K,) give a final beam (K, N, 6) and images (K, H, W).
    Consecutive elements that act as matrices (linear tracking, no misalignment) are multiplied
    into one matrix per setting before it touches the particles: a screen transforms only x and y
    (two rows of the matrix), and the final beam is computed when `TrackResult.beam` is first read.
    Other elements (kick_drift or chromatic tracking, offsets, cavities, and elements of other kinds
    with a `track(particles, p0c, species, overrides)` method, such as the neural elements of models/) take
    the particles themselves; an RF cavity changes the reference momentum p0c for the elements after it.
    An aperture reads x, y like a screen (through the fused matrix) and multiplies the particles'
    survival weights (..., N); screens then image, and `TrackResult.beam` weights, the survivors.
    """

    def __init__(self, elements: list[Element], space_charge=None):
        super().__init__()
        if space_charge is not None and not isinstance(space_charge, (SpaceCharge, LinearSpaceCharge)):
            raise TypeError(f"space_charge must be a sim.SpaceCharge, sim.LinearSpaceCharge (or GaussianSpaceCharge) "
                            f"or None, got {type(space_charge).__name__}")
        self.space_charge = space_charge
        names = [e.name for e in elements]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"element names must be unique; repeated: {duplicates}")
        self.elements = nn.ModuleList(elements)

    @classmethod
    def from_list(cls, items: list[dict], space_charge=None, element_types: dict | None = None) -> "Lattice":
        """Build from lattice-file entries `{type: ..., name: ..., <parameters>}`; element_types: more types
        (name -> constructor), e.g. the neural elements of models/, which sim does not know."""
        types = {**ELEMENT_TYPES, **(element_types or {})}
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"a lattice must be a list of elements, got {type(items).__name__}")
        if not items:
            raise ValueError("the lattice is empty (it needs at least one element)")
        elements = []
        for index, item in enumerate(items):
            if not isinstance(item, dict) or "type" not in item:
                raise ValueError(f"lattice entry {index} must be a mapping with a 'type', got {item!r}")
            item = dict(item)
            kind = item.pop("type")
            if kind not in types:
                raise ValueError(
                    f"lattice entry {index} ({item.get('name', '?')}): unknown element type {kind!r}; "
                    f"known types: {', '.join(types)}"
                )
            item.setdefault("name", f"{kind}_{index}")
            try:
                elements.append(types[kind](**item))
            except TypeError as err:
                raise ValueError(f"lattice entry {index} ({item['name']}): {err}") from None
        return cls(elements, space_charge=space_charge)

    @classmethod
    def from_file(cls, path, space_charge=None, element_types: dict | None = None) -> "Lattice":
        """Build from a YAML or JSON lattice file."""
        text = Path(path).read_text()
        return cls.from_list(load_lattice_text(text, str(path)), space_charge=space_charge, element_types=element_types)

    @classmethod
    def from_cheetah(cls, segment, space_charge=None) -> "Lattice":
        """Build from a `cheetah.Segment` (see `sim.cheetah_import` for the conversions)."""
        from .cheetah_import import elements_from_cheetah

        return cls(elements_from_cheetah(segment), space_charge=space_charge)

    def to_list(self) -> list[dict]:
        """The lattice-file entries (inverse of `from_list`)."""
        return [e.to_dict() for e in self.elements]

    def __getitem__(self, name: str) -> Element:
        for element in self.elements:
            if element.name == name:
                return element
        raise KeyError(f"no element named {name!r}; elements: {[e.name for e in self.elements]}")

    @property
    def screens(self) -> dict[str, Screen]:
        return {e.name: e for e in self.elements if isinstance(e, Screen)}

    def split_settings(self, settings: dict | None) -> dict[str, dict[str, torch.Tensor]]:
        """Group {"Q1.k1": v} into {"Q1": {"k1": v}}, checking every name."""
        grouped: dict[str, dict] = {}
        names = {e.name: e for e in self.elements}
        for key, value in (settings or {}).items():
            element, parameter = parse_setting_name(key)
            if element not in names:
                raise KeyError(f"setting {key!r}: no element named {element!r} in the lattice")
            if parameter not in names[element].parameters_defaults:
                raise KeyError(
                    f"setting {key!r}: {type(names[element]).__name__} {element} has no parameter "
                    f"{parameter!r}; known: {sorted(names[element].parameters_defaults)}"
                )
            grouped.setdefault(element, {})[parameter] = value
        return grouped

    def _sliced(self, element: LinearElement, overrides, particles, matrix, p0c, beam):
        """An element cut into n slices of at most `space_charge.max_step`, each tracked as half slice,
        space-charge kick over the slice length, half slice (second order in the step)."""
        length = element.parameter_values(overrides, particles)["length"]
        longest = float(length.detach().max()) if length.numel() else 0.0
        if longest == 0:
            return _step(element, overrides, particles, matrix, p0c, beam.species)
        n = max(1, math.ceil(longest / self.space_charge.max_step - 1e-9))
        faces = [(piece == 0, piece == 2 * n - 1) for piece in range(2 * n)]
        slices = {face: element.slice_overrides(overrides, particles, 0.5 / n, *face) for face in set(faces)}

        def run(particles, matrix, p0c, first: int, last: int):  # slices first..last-1
            for piece in range(2 * first, 2 * last):
                particles, matrix, p0c = _step(element, slices[faces[piece]], particles, matrix, p0c, beam.species)
                if piece % 2 == 0:
                    particles, matrix = _apply(particles, matrix), None
                    particles = self.space_charge.kick(particles, p0c, beam.species, beam.charge, length / n)
            return particles, matrix, p0c

        # with checkpointing, groups of ~sqrt(2 n) slices keep only their incoming particles for the
        # backward pass and are tracked again there, one group at a time; the last (full) group is not
        group = math.ceil(math.sqrt(2 * n)) if self.space_charge.checkpoint and torch.is_grad_enabled() else n
        starts = [0] + list(range(n % group or group, n, group))
        for first, last in zip(starts, starts[1:]):
            particles, matrix, p0c = checkpoint(run, particles, matrix, p0c, first, last, use_reentrant=False)
        return run(particles, matrix, p0c, starts[-1], n)

    def forward(self, beam: ParticleBeam, settings: dict | None = None, screen_rows: dict | None = None) -> TrackResult:
        """Track `beam` with `settings`; `screen_rows` {screen: index or bool mask over the (K,)
        settings} images a screen only at those settings (a screen read at some settings only)."""
        grouped = self.split_settings(settings)
        screen_rows = screen_rows or {}
        unknown = set(screen_rows) - set(self.screens)
        if unknown:
            raise KeyError(f"screen_rows names unknown screen(s) {sorted(unknown)}; screens: {sorted(self.screens)}")
        particles, p0c, weights = beam.particles, beam.p0c, beam.weights
        matrix = None  # the map since the particles were last updated, (..., 6, 6)
        images = {}
        for element in self.elements:
            overrides = grouped.get(element.name)
            if isinstance(element, Screen):
                x, y = _apply_xy(particles, matrix)
                x, y, weight = (x, y, None) if weights is None else _surviving(x, y, weights)
                if element.name in screen_rows:
                    rows = screen_rows[element.name]
                    x, y, overrides = _select_rows(x, y, overrides, rows)
                    weight = None if weight is None else weight[torch.as_tensor(rows, device=x.device)]
                images[element.name] = element.image_xy(x, y, weight, overrides=overrides)
            elif isinstance(element, Aperture):
                survival = element.survival(*_apply_xy(particles, matrix), overrides)
                weights = survival if weights is None else weights * survival
            elif not isinstance(element, LinearElement):
                if not callable(getattr(element, "track", None)):
                    raise TypeError(f"cannot track through {type(element).__name__} {element.name}")
                # another kind of element (a neural one): tracked whole, particle by particle; with space
                # charge on, no kicks inside (a learned map of a section holds its collective effects)
                particles, p0c = element.track(_apply(particles, matrix), p0c, beam.species, overrides)
                matrix = None
            elif self.space_charge is None or beam.charge == 0:
                particles, matrix, p0c = _step(element, overrides, particles, matrix, p0c, beam.species)
            else:
                if weights is not None:
                    raise ValueError(f"space charge in {element.name} after an aperture (or with weighted particles) "
                                     "is not supported: the kick would count the lost particles")
                particles, matrix, p0c = self._sliced(element, overrides, particles, matrix, p0c, beam)
        return TrackResult(lambda: _final_beam(beam, _apply(particles, matrix), p0c, weights), images)


def _final_beam(beam: ParticleBeam, particles: torch.Tensor, p0c, weights) -> ParticleBeam:
    """The tracked beam; with weights of more settings than the particles (an aperture scanned after
    the last scanned magnet), the particles expanded (a view) to the settings shape of the weights."""
    if weights is not None:
        particles = particles.expand(*torch.broadcast_shapes(weights.shape, particles.shape[:-1]), 6)
    return beam.with_particles(particles, p0c=p0c, weights=weights)


def _surviving(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor):
    """x, y and survival weights (..., N) broadcast to one shape, the weights normalized to unit sum
    over the particles (a screen images the surviving particles; nothing when none survives)."""
    x, y, weights = torch.broadcast_tensors(x, y, weights)
    return x, y, weights * (1 / weights.sum(-1, keepdim=True).clamp(min=torch.finfo(weights.dtype).tiny))


def _step(element: LinearElement, overrides, particles, matrix, p0c, species):
    """One element: its matrix joins `matrix`, or the particles are tracked through it."""
    if element.is_matrix(overrides, particles):
        m = element.transfer_map(p0c, species, particles, overrides)
        return particles, (m if matrix is None else m @ matrix), p0c
    particles = _apply(particles, matrix)
    particles, p0c = element.track(particles, p0c, species, overrides)
    return particles, None, p0c


def _select_rows(x: torch.Tensor, y: torch.Tensor, overrides: dict | None, rows):
    """x, y (K, N) and per-setting screen settings (K, 2) restricted to `rows` (indices or a (K,) mask)."""
    rows = torch.as_tensor(rows, device=x.device)
    if x.ndim != 2:
        raise ValueError(f"screen_rows needs settings of shape (K,); the particles at the screen are {tuple(x.shape)}")
    if overrides:
        overrides = {k: (v[rows] if torch.is_tensor(v) and v.ndim >= 2 else v) for k, v in overrides.items()}
    return x[rows], y[rows], overrides


def _apply(particles: torch.Tensor, matrix: torch.Tensor | None) -> torch.Tensor:
    """particles (..., N, 6) transformed by matrix (..., 6, 6); leading shapes broadcast."""
    if matrix is None:
        return particles
    return particles @ matrix.transpose(-1, -2)


def _apply_xy(particles: torch.Tensor, matrix: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x and y (..., N) of particles (..., N, 6) transformed by matrix (..., 6, 6).

    Only the x and y rows of the matrix are applied, as (..., 2, 6) @ (6, N): for a scan of one
    input beam that is one matrix product with contiguous (settings x N) outputs, and its backward
    never builds a (..., N, 6) gradient.
    """
    if matrix is None:
        return particles[..., 0], particles[..., 2]
    xy = matrix[..., [0, 2], :] @ particles.transpose(-1, -2)
    return xy[..., 0, :], xy[..., 1, :]


def _yaml_loader():
    """PyYAML's SafeLoader (YAML 1.1) reads `1e-3` (an exponent without a dot, as JSON writes it) as a
    string; this loader reads it as a float, as YAML 1.2 and JSON do."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    return Loader


def load_lattice_text(text: str, source: str = "lattice") -> list:
    """Parse YAML (or JSON, a subset) lattice text into entries."""
    import yaml

    try:
        items = yaml.load(text, Loader=_yaml_loader())
    except yaml.YAMLError as err:
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"{source}: not valid YAML or JSON{where}: {problem}") from None
    if not isinstance(items, list):
        raise ValueError(f"{source}: a lattice file must hold a list of elements")
    if not items:
        raise ValueError(f"{source}: the lattice is empty (it needs at least one element)")
    return items
