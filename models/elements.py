"""Neural lattice elements: networks that track (..., N, 6) particles inside a `sim.Lattice`.

In lattice files: `{type: ResidualElement | SectionMap, name: ..., weights: <file>, <arguments>}`
(DESIGN.md, "Neural elements"). `sim` does not know these types: `element_types(base_dir)` gives the
constructors to pass to `sim.Lattice.from_list(..., element_types=...)`, with weights files relative to
`base_dir`. A weights file holds the element's definition (`spec`): loading weights trained for another
element or section is an error, as is a missing file.

Both elements start as their physical map (the network's last layer is zero), so an untrained element
tracks exactly as the physics it corrects.
"""

import contextlib
import functools
import itertools
import math
import os
from pathlib import Path

import torch
from torch import nn

import sim
from sim.lattice import ELEMENT_TYPES
from sim.space_charge_linear import section_matrix

WEIGHTS_FORMAT = "psr-neural-element"
WEIGHTS_VERSION = 1
_first_order_depth = 0  # > 0 inside first_order_maps()


@contextlib.contextmanager
def first_order_maps():
    """Within it, maps of a whole bunch (SectionMap, CorrectedSection) track by their section's first-order
    physics (no network, no space charge): for linearizing a lattice about the reference particle with space
    charge off (psr.training.prior.screen_maps), where a handful of probe particles is no bunch to normalize by
    or to kick with the bunch's charge."""
    global _first_order_depth
    _first_order_depth += 1
    try:
        yield
    finally:
        _first_order_depth -= 1


def first_order_active() -> bool:
    """Whether the caller is inside first_order_maps()."""
    return _first_order_depth > 0


def _mlp(n_in: int, n_out: int, width: int, layers: int) -> nn.Sequential:
    """SiLU MLP whose last layer starts at zero (the element starts as its physics)."""
    modules, size = [], n_in
    for _ in range(layers):
        modules += [nn.Linear(size, width), nn.SiLU()]
        size = width
    modules.append(nn.Linear(size, n_out))
    nn.init.zeros_(modules[-1].weight)
    nn.init.zeros_(modules[-1].bias)
    return nn.Sequential(*modules)


def _six(value, what: str) -> torch.Tensor:
    scale = torch.as_tensor(value, dtype=torch.float64).flatten()
    scale = scale.expand(6).clone() if scale.numel() == 1 else scale
    if scale.numel() != 6 or not (scale > 0).all():
        raise ValueError(f"{what} must be one positive value or six (x, px, y, py, z, pz), got {value!r}")
    return scale


class NeuralElement(nn.Module):
    """Base of neural elements: a name, the settings it takes (`parameters_defaults`, addressed as
    "<name>.<parameter>"), `track`, `to_dict` and its weights file."""

    parameters_defaults: dict = {}

    def __init__(self, name: str, weights: str | None = None, base_dir: str | None = None):
        super().__init__()
        self.name = name
        self.weights = weights
        self.base_dir = base_dir

    def spec(self) -> dict:
        """The arguments that define the element (stored with its weights; what they were trained for)."""
        raise NotImplementedError

    def weights_path(self, path: str | None = None) -> Path:
        path = Path(path if path is not None else self.weights)
        return path if path.is_absolute() or self.base_dir is None else Path(self.base_dir) / path

    def load_weights(self, path: str | None = None) -> None:
        """Read the weights file; one clear error if it is missing or was trained for another element."""
        file = self.weights_path(path)
        where = f"{type(self).__name__} {self.name}: weights file {file}"
        if not file.is_file():
            raise ValueError(f"{where}: no such file")
        try:
            saved = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 (torch raises many kinds for a bad file)
            raise ValueError(f"{where}: not a weights file ({type(err).__name__})") from None
        if not isinstance(saved, dict) or saved.get("format") != WEIGHTS_FORMAT:
            raise ValueError(f"{where}: not a psr neural-element weights file")
        if saved.get("type") != type(self).__name__:
            raise ValueError(f"{where}: holds a {saved.get('type')}, not a {type(self).__name__}")
        if saved.get("spec") != self.spec():
            differ = sorted(k for k in set(saved.get("spec", {})) | set(self.spec())
                            if saved.get("spec", {}).get(k) != self.spec().get(k))
            raise ValueError(f"{where}: was trained for another element or section (differs in {', '.join(differ)}: "
                             f"{ {k: saved.get('spec', {}).get(k) for k in differ} })")
        self.load_state_dict(saved["state_dict"])

    def save_weights(self, path: str) -> Path:
        """Write the weights file (atomically: a temporary file renamed into place)."""
        file = Path(path)
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.tmp{os.getpid()}")
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        torch.save({"format": WEIGHTS_FORMAT, "version": WEIGHTS_VERSION, "type": type(self).__name__,
                    "spec": self.spec(), "state_dict": state}, tmp)
        os.replace(tmp, file)
        return file

    def to_dict(self) -> dict:
        entry = {"type": type(self).__name__, "name": self.name, **self.spec()}
        if self.weights is not None:
            entry["weights"] = str(self.weights)
        return entry

    def parameter_values(self, overrides: dict | None, like: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class ResidualElement(NeuralElement):
    """A physical element's map plus a network's correction of each particle, as a function of the particle's
    coordinates and the element's settings: x_out = M(x; p) + s * f(x / s, p_i / p_scale_i).

    element: the physical element's lattice entry without its name, e.g. {type: Quadrupole, length: 0.1, k1: 0};
    its parameters are this element's settings ("<name>.k1"). inputs: the parameters fed to the network
    (default: those of the element that are scanned in practice: k1, k2, ks, angle, voltage, phase, where
    present); input_scales: their typical sizes (one per input, default 1). coordinate_scale: one value or six,
    the size of a unit network input and output per coordinate [m or rad]."""

    NETWORK_INPUTS = ("k1", "k2", "ks", "angle", "voltage", "phase")

    def __init__(self, name: str, element: dict, inputs: list[str] | None = None,
                 input_scales: list[float] | None = None, coordinate_scale: float | list[float] = 1e-3,
                 hidden_width: int = 32, hidden_layers: int = 2, weights: str | None = None,
                 base_dir: str | None = None):
        super().__init__(name, weights, base_dir)
        if not isinstance(element, dict) or element.get("type") not in ELEMENT_TYPES or "name" in element:
            raise ValueError(f"ResidualElement {name}: element must be a physical element's entry without a name, "
                             f"e.g. {{type: Quadrupole, length: 0.1}}, got {element!r}")
        entry = dict(element)
        self.physical = ELEMENT_TYPES[entry.pop("type")](name=name, **entry)
        if not isinstance(self.physical, sim.element.LinearElement):
            raise ValueError(f"ResidualElement {name}: cannot wrap a {type(self.physical).__name__} (it does not track)")
        self.element = dict(element)
        self.parameters_defaults = self.physical.parameters_defaults
        known = [k for k in self.NETWORK_INPUTS if k in self.parameters_defaults]
        self.inputs = list(known if inputs is None else inputs)
        unknown = [k for k in self.inputs if k not in self.parameters_defaults]
        if unknown:
            raise ValueError(f"ResidualElement {name}: inputs {unknown} are not parameters of "
                             f"{element['type']}; known: {sorted(self.parameters_defaults)}")
        scales = [1.0] * len(self.inputs) if input_scales is None else [float(v) for v in input_scales]
        if len(scales) != len(self.inputs) or min(scales, default=1.0) <= 0:
            raise ValueError(f"ResidualElement {name}: input_scales needs one positive value per input {self.inputs}")
        self.input_scales = scales
        self.coordinate_scale = [float(v) for v in _six(coordinate_scale, f"ResidualElement {name}: coordinate_scale")]
        self.hidden = (int(hidden_width), int(hidden_layers))
        self.register_buffer("scale", torch.tensor(self.coordinate_scale, dtype=torch.float32))
        self.register_buffer("setting_scale", torch.tensor(scales, dtype=torch.float32))
        self.network = _mlp(6 + len(self.inputs), 6, *self.hidden)
        if weights is not None:
            self.load_weights()

    def spec(self) -> dict:
        return {"element": self.element, "inputs": self.inputs, "input_scales": self.input_scales,
                "coordinate_scale": self.coordinate_scale, "hidden_width": self.hidden[0],
                "hidden_layers": self.hidden[1]}

    def parameter_values(self, overrides, like):
        return self.physical.parameter_values(overrides, like)

    def track(self, particles: torch.Tensor, p0c, species, overrides: dict | None = None):
        """Particles (..., N, 6) through the physical map plus the correction; returns (particles, p0c)."""
        out, p0c_out = self.physical.track(particles, p0c, species, overrides)
        p = self.physical.parameter_values(overrides, particles)
        scale = self.scale.to(particles)
        features = [particles / scale]
        for key, size in zip(self.inputs, self.setting_scale.to(particles)):
            value = p[key] / size  # () or the settings shape (...)
            features.append(value.reshape(*value.shape, 1, 1))
        features = _stack_features(features, out)
        return out + self.network(features) * scale, p0c_out


def _stack_features(features: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Concatenate per-particle features (..., N, k) broadcast to the leading shape of `like` (..., N, 6)."""
    lead = like.shape[:-1]
    return torch.cat([f.expand(*lead, f.shape[-1]) if f.shape[:-1] != lead else f for f in features], dim=-1)


class SectionMap(NeuralElement):
    """A learned map of a whole section (several elements, e.g. a quadrupole and a drift with space charge):
    the section's first-order map (its elements tracked linearly, no space charge) plus a correction that is
    a polynomial of each particle's coordinates relative to its bunch, u = (x - mean) / rms (per setting),
    whose coefficients a network computes from the bunch: its log rms sizes relative to `reference_rms`,
    its normalized covariances (convergence, coupling) and the section's settings. Collective effects such
    as space charge depend on all of them, and on the particle through a smooth, mostly odd function:
        x_out = M(p) x + rms * (phi(u) @ C(c)) * exp(A c + b),
    phi(u) = (u_i, q_a q_b, q_a q_b^2) with q the positions (u_x, u_y, u_z) (basis "cubic_positions"), or every
    monomial of degree 1 to 3 of (u_x, u_px, u_y, u_py, u_z) and u_pz (basis "cubic"), c the bunch's features, C a
    network, exp(A c + b) a learned power law of the sizes. The network runs once per setting, the polynomial per particle.

    section: the lattice entries the map replaces; inputs: settings of its elements ("Q1.k1") the map takes,
    as its own settings "<name>.Q1_k1" (`psr fit`'s model.replace routes a scan's "Q1.k1" there);
    input_scales: their typical sizes; reference_rms: six typical rms values [m, rad] of the input beams.
    space_charge: None, or {charge: [C], max_step: [m]}: M(p) then holds the linear space charge of the bunch's
    rms-equivalent Gaussian ellipsoid (sim.space_charge_linear, carried along the section as 6x6 matrices of
    the bunch's covariance), so the network learns only the nonlinear rest (sections of drifts and magnets), and
    the correction is in units of the output's rms instead of the input's. born: with space_charge, M(p) also holds
    the first-order effect of the field's nonlinear part (`born_correction`, no network)."""

    def __init__(self, name: str, section: list[dict], reference_rms: list[float], inputs: list[str] | None = None,
                 input_scales: list[float] | None = None, hidden_width: int = 64, hidden_layers: int = 3,
                 basis: str = "cubic_positions", space_charge: dict | None = None, born: bool = False,
                 shape_condition: bool = False, weights: str | None = None, base_dir: str | None = None):
        super().__init__(name, weights, base_dir)
        if basis not in BASES:
            raise ValueError(f"SectionMap {name}: basis must be one of {sorted(BASES)} (the polynomial phi), got {basis!r}")
        self.basis = basis
        self.space_charge = _linear_space_charge(space_charge, section, f"SectionMap {name}: space_charge")
        if not isinstance(born, bool) or (born and self.space_charge is None):
            raise ValueError(f"SectionMap {name}: born must be true or false, and true needs space_charge {{charge, "
                             f"max_step}}; got {born!r}")
        self.born = born
        if not isinstance(shape_condition, bool):
            raise ValueError(f"SectionMap {name}: shape_condition must be true or false, got {shape_condition!r}")
        self.shape_condition = shape_condition
        entries = [{**e, "tracking": "linear"} if e.get("type") in LINEAR_TRACKING else dict(e) for e in section]
        try:
            self.physical = sim.Lattice.from_list(entries)
        except (ValueError, TypeError) as err:
            raise ValueError(f"SectionMap {name}: section: {err}") from None
        if any(not isinstance(e, sim.element.LinearElement) for e in self.physical.elements):
            raise ValueError(f"SectionMap {name}: section may hold only magnets, drifts and cavities")
        self.section = [dict(e) for e in section]
        self.inputs = list(inputs or [])
        try:
            self.physical.split_settings(dict.fromkeys(self.inputs, 0.0))
        except (KeyError, ValueError) as err:
            raise ValueError(f"SectionMap {name}: inputs: {err.args[0]}") from None
        scales = [1.0] * len(self.inputs) if input_scales is None else [float(v) for v in input_scales]
        if len(scales) != len(self.inputs) or min(scales, default=1.0) <= 0:
            raise ValueError(f"SectionMap {name}: input_scales needs one positive value per input {self.inputs}")
        self.input_scales = scales
        # its settings: "<name>.<element>_<parameter>" for each input "<element>.<parameter>" of the section
        self.parameters_defaults = {section_setting_key(k): float(getattr(self.physical[k.rpartition(".")[0]],
                                                                          k.rpartition(".")[2]).reshape(-1)[0])
                                    for k in self.inputs}
        self.reference_rms = [float(v) for v in _six(reference_rms, f"SectionMap {name}: reference_rms")]
        self.hidden = (int(hidden_width), int(hidden_layers))
        self.register_buffer("reference", torch.tensor(self.reference_rms, dtype=torch.float32))
        self.register_buffer("setting_scale", torch.tensor(scales, dtype=torch.float32))
        n_condition = 6 + 15 + len(self.inputs) + (len(_FOURTH_MOMENTS) if shape_condition else 0)
        self.network = _mlp(n_condition, 6 * BASES[basis][1], *self.hidden)
        self.amplitude = nn.Linear(n_condition, 6)
        nn.init.zeros_(self.amplitude.weight)
        nn.init.zeros_(self.amplitude.bias)
        if weights is not None:
            self.load_weights()

    def spec(self) -> dict:
        spec = {"section": self.section, "reference_rms": self.reference_rms, "inputs": self.inputs,
                "input_scales": self.input_scales, "hidden_width": self.hidden[0], "hidden_layers": self.hidden[1],
                "basis": self.basis}
        if self.space_charge is not None:  # absent otherwise: weights files written before it stay valid
            spec["space_charge"] = dict(self.space_charge)
        if self.born:
            spec["born"] = True
        if self.shape_condition:  # absent otherwise, as space_charge
            spec["shape_condition"] = True
        return spec

    def parameter_values(self, overrides, like):
        overrides = overrides or {}
        unknown = set(overrides) - set(self.parameters_defaults)
        if unknown:
            raise KeyError(f"SectionMap {self.name} has no setting(s) {sorted(unknown)}; known: "
                           f"{sorted(self.parameters_defaults)}")
        return {k: torch.as_tensor(overrides.get(k, v)).to(like) for k, v in self.parameters_defaults.items()}

    def track(self, particles: torch.Tensor, p0c, species, overrides: dict | None = None):
        p = self.parameter_values(overrides, particles)
        settings = {k: p[section_setting_key(k)] for k in self.inputs}
        if first_order_active():  # the section's elements tracked linearly, space charge off
            linear = self.physical(sim.ParticleBeam(particles, p0c=p0c, species=species), settings).beam
            return linear.particles, linear.p0c
        mean = particles.mean(-2, keepdim=True)
        centred = particles - mean
        cov = centred.transpose(-1, -2) @ centred / particles.shape[-2]  # (..., 6, 6)
        kicks = [] if self.born else None
        if self.space_charge is None:
            linear = self.physical(sim.ParticleBeam(particles, p0c=p0c, species=species), settings).beam
            out, p0c_out = linear.particles, linear.p0c
        else:  # mean through the plain map, offsets from it through the map with linear space charge
            r_sc, r_0 = section_matrix(self.physical.elements, self.physical.split_settings(settings), cov, p0c,
                                       species, self.space_charge["charge"], self.space_charge["max_step"], kicks)
            out, p0c_out = centred @ r_sc.transpose(-1, -2) + mean @ r_0.transpose(-1, -2), p0c
            if self.born:
                out = out + born_correction(centred, cov, kicks, r_sc)
        lead = out.shape[:-2]
        rms = cov.diagonal(dim1=-2, dim2=-1).clamp_min(1e-24).sqrt()  # (..., 6); no NaN gradient at 0
        correlation = cov / (rms.unsqueeze(-1) * rms.unsqueeze(-2))
        upper = torch.triu_indices(6, 6, 1, device=particles.device)
        u = centred / rms.unsqueeze(-2)  # the input's own leading shape: one basis for every setting of a scan
        condition = [torch.log(rms / self.reference.to(particles)), correlation[..., upper[0], upper[1]]]
        for key, size in zip(self.inputs, self.setting_scale.to(particles)):
            condition.append((settings[key] / size).reshape(*settings[key].shape, 1))
        if self.shape_condition:  # the bunch's shape beyond its covariance
            condition.append(log_fourth_moments(u[..., 0::2]))
        condition = torch.cat([c.expand(*lead, c.shape[-1]) for c in condition], -1)  # (..., n_condition)
        function, size = BASES[self.basis]
        coefficients = self.network(condition).reshape(*lead, size, 6)
        if self.space_charge is None:  # in units of the input's rms
            scale = rms.expand(*lead, 6)
        else:  # of the output's (through a tight waist the output is much smaller than the input)
            scale = (r_sc @ cov @ r_sc.transpose(-1, -2)).diagonal(dim1=-2, dim2=-1).clamp_min(1e-24).sqrt()
        gain = torch.exp(self.amplitude(condition)) * scale  # (..., 6)
        correction = function(u) @ coefficients  # broadcasts to (..., N, 6)
        return out + correction * gain.unsqueeze(-2), p0c_out


# with shape_condition: <q_i^2 q_j^2> of the normalized positions (x, y, z): kurtosis and its cross terms (halos,
# hollow beams and tails differ there at equal covariance, and so do their fields)
_FOURTH_MOMENTS = [(0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)]


def log_fourth_moments(q: torch.Tensor) -> torch.Tensor:
    """(..., 6) log <q_i^2 q_j^2> over the particles of positions q (..., N, 3) in units of their rms, (i, j) as
    _FOURTH_MOMENTS: log 3 and log 1 for a Gaussian bunch, log 1.8 along a uniform one's edges."""
    return torch.log(torch.stack([(q[..., i].square() * q[..., j].square()).mean(-1) for i, j in _FOURTH_MOMENTS],
                                 -1).clamp_min(1e-6))


def polynomial_basis(u: torch.Tensor) -> torch.Tensor:
    """(..., N, 24): u_i (all six), and of the positions q = (u_x, u_y, u_z) q_a q_b and q_a q_b^2 (forces
    depend on where a particle is) of normalized coordinates u (..., N, 6); built by broadcasting."""
    q = u[..., 0::2]
    outer = q.unsqueeze(-1) * q.unsqueeze(-2)  # (..., N, 3, 3)
    cubic = q.unsqueeze(-1) * q.square().unsqueeze(-2)
    return torch.cat([u, outer.flatten(-2), cubic.flatten(-2)], -1)


# every monomial of degree 2 and 3 in (u_x, u_px, u_y, u_py, u_z): through a waist where a particle is
# depends on its momentum as much as on its position
_MONOMIALS = [list(c) for d in (2, 3) for c in itertools.combinations_with_replacement(range(5), d)]


def cubic_basis(u: torch.Tensor) -> torch.Tensor:
    """(..., N, 6 + 15 + 35): u_i (all six) and every monomial of degree 2 and 3 of the first five."""
    products = [u[..., m[0]] * u[..., m[1]] * (u[..., m[2]] if len(m) == 3 else 1) for m in _MONOMIALS]
    return torch.cat([u, torch.stack(products, -1)], -1)


def field_shape_basis(u: torch.Tensor) -> torch.Tensor:
    """(..., N, 24 + 7): polynomial_basis and the field shapes of a Gaussian bunch at the positions q = (u_x, u_y,
    u_z): q_t (1 - exp(-r^2/2)) / r^2 for q_t = u_x, u_y (r^2 = u_x^2 + u_y^2: a long round bunch), the same
    times exp(-u_z^2/2), and q (1 - exp(-s^2/2)) / s^2 (s = |q|): linear in the core, falling as 1/r outside as a
    bunch's field does, which no low-order polynomial does (benchmarks/sc_pairs_convergence.py: the best map of
    each held-out beam in this basis misses the PIC emittances by a median 3.6 / 1.6 % (visited / synthetic beams)
    against 10.0 / 5.7 % with polynomial_basis)."""
    return torch.cat([polynomial_basis(u), gaussian_field_shapes(u[..., 0::2])], -1)


def gaussian_field_shapes(q: torch.Tensor) -> torch.Tensor:
    """(..., N, 7) field shapes (field_shape_basis) at positions q = (x, y, z) (..., N, 3) in rms units."""
    r2 = q[..., :2].square().sum(-1, keepdim=True)
    round_ = _gaussian_shape(r2)
    return torch.cat([q[..., :2] * round_, q[..., :2] * round_ * torch.exp(-0.5 * q[..., 2:].square()),
                      q * _gaussian_shape(q.square().sum(-1, keepdim=True))], -1)


def _gaussian_shape(r2: torch.Tensor) -> torch.Tensor:
    """(1 - exp(-r2/2)) / r2, its series 1/2 - r2/8 near 0 (no 0/0 and a finite gradient)."""
    return torch.where(r2 > 1e-6, -torch.expm1(-0.5 * r2) / r2.clamp_min(1e-6), 0.5 - r2 / 8)


def linear_basis(u: torch.Tensor) -> torch.Tensor:
    """(..., N, 6): u itself: the correction is a learned 6x6 map per setting (second moments, emittances)."""
    return u


def born_correction(centred: torch.Tensor, cov: torch.Tensor, kicks: list, r_sc: torch.Tensor) -> torch.Tensor:
    """(..., N, 6): the first-order (Born) change of the section's output by the nonlinear part of the space-charge
    field, each kick's taken where the particle is on its linear-space-charge trajectory and carried to the exit by
    the linear map after it. The field is a long Gaussian bunch's with a round profile in rms units: at w = (x, y) /
    rms and line density exp(-w_z^2 / 2), E = sqrt2 * 4 * shape(rho) * line * (the rms-equivalent linear field),
    shape = (1 - exp(-rho^2 / 2)) / rho^2 (its rms-equivalent part is the linear field: mean of w^2 sqrt2 4 shape
    line = 1), so the kick beyond the linear one is dp = (k - 1) r (sqrt2 4 shape line - 1) in px, py.
    centred: input minus mean; cov: its covariance (..., 6, 6); kicks: (map to the kick, kick matrix) of each
    (sim.space_charge_linear.section_matrix); r_sc: the whole section's map."""
    positions, momenta = [0, 2, 4], [1, 3]
    correction = 0.0
    for to, k in kicks:
        rows = to[..., positions, :]  # (..., 3, 6): x, y, z at the kick
        at = centred @ rows.transpose(-1, -2)  # (..., N, 3)
        size = (rows @ cov @ rows.transpose(-1, -2)).diagonal(dim1=-2, dim2=-1).clamp_min(1e-30).sqrt()
        w = at / size.unsqueeze(-2)
        rho2 = w[..., 0].square() + w[..., 1].square()
        gain = 4 * math.sqrt(2) * _gaussian_shape(rho2) * torch.exp(-0.5 * w[..., 2].square()) - 1
        kick = (at @ k[..., momenta, :][..., :, positions].transpose(-1, -2)) * gain.unsqueeze(-1)  # (..., N, 2): px, py
        after = r_sc @ torch.linalg.inv(k @ to)  # from just after the kick to the exit
        correction = correction + kick @ after[..., :, momenta].transpose(-1, -2)
    return correction


BASES = {"cubic_positions": (polynomial_basis, 6 + 9 + 9), "cubic": (cubic_basis, 6 + len(_MONOMIALS)),
         "linear": (linear_basis, 6), "field_shapes": (field_shape_basis, 6 + 9 + 9 + 7)}


def section_setting_key(name: str) -> str:
    """The SectionMap setting of a section setting "<element>.<parameter>": "<element>_<parameter>"."""
    element, _, parameter = name.rpartition(".")
    return f"{element}_{parameter}"


LINEAR_TRACKING = ("Drift", "Quadrupole", "Sextupole", "Dipole", "Solenoid")


def _linear_space_charge(config, section: list[dict], where: str) -> dict | None:
    """{charge, max_step} of a SectionMap's linear space charge (None: none); one clear error otherwise."""
    if config is None:
        return None
    if not isinstance(config, dict) or set(config) - {"charge", "max_step"} or "charge" not in config:
        raise ValueError(f"{where} must be {{charge: <C>, max_step: <m>}} (max_step optional, default 0.1), "
                         f"got {config!r}")
    charge, max_step = config["charge"], config.get("max_step", 0.1)
    if not (isinstance(charge, (int, float)) and math.isfinite(charge)):
        raise ValueError(f"{where}: charge must be a number of coulombs, got {charge!r}")
    if not (isinstance(max_step, (int, float)) and math.isfinite(max_step) and max_step > 0):
        raise ValueError(f"{where}: max_step must be a positive length in metres, got {max_step!r}")
    others = sorted({e.get("type") for e in section} - set(LINEAR_TRACKING))
    if others:
        raise ValueError(f"{where}: linear space charge needs a section of drifts and magnets, not {others}")
    return {"charge": abs(float(charge)), "max_step": float(max_step)}


def read_spec(path) -> tuple[str, dict]:
    """(type, spec) of a weights file: what its element was trained as (for entries that give only weights)."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"weights file {file}: no such file")
    try:
        saved = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"weights file {file}: not a weights file ({type(err).__name__})") from None
    if not isinstance(saved, dict) or saved.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"weights file {file}: not a psr neural-element weights file")
    return saved["type"], dict(saved["spec"])


NEURAL_ELEMENT_TYPES = {cls.__name__: cls for cls in (ResidualElement, SectionMap)}


def element_types(base_dir: str | Path | None = None) -> dict:
    """Constructors of the neural element types for `sim.Lattice.from_list(element_types=...)`, reading weights
    files relative to `base_dir` (a lattice file's folder)."""
    base = None if base_dir is None else str(base_dir)
    return {name: functools.partial(cls, base_dir=base) for name, cls in NEURAL_ELEMENT_TYPES.items()}
