"""Machine parameters fitted together with the beam (`model.calibrate`, DESIGN.md "Calibration").

Each calibrated value is init + step * theta, theta a trainable parameter starting at 0: Adam moves theta
by about the learning rate per optimizer step whatever its units, so `step` is the value's natural unit
(the prior's width, 0.1 for a scale, 1 mm for a position). A Gaussian prior adds
prior_weight * 0.5 * sum(((value - init) / prior_sigma)^2) to the objective: the image mismatch is not a
log-likelihood, so the weight says how much one sigma costs against it (0.5 * prior_weight).
"""

import numpy as np
import torch
from torch import nn

from psr.data.calibration import Correction, apply_corrections, parse_corrections


STARTS = ("init", "random")  # where the fit starts: at init, or at init + step * N(0, 1) (ensemble members)


def _key(name: str) -> str:
    return name.replace(".", ":")  # a module's parameter names may not hold dots


class Calibration(nn.Module):
    """The trainable corrections of `model.calibrate` {name: {kind, init, prior_sigma, step}}; built
    against the lattice and setting names of a scan file by `bind` (before the optimizer is made)."""

    def __init__(self, spec: dict | None, prior_weight: float = 0.01, start: str = "init"):
        super().__init__()
        if start not in STARTS:
            raise ValueError(f"model.calibration_start must be one of {list(STARTS)}, got {start!r}")
        self.spec = dict(spec or {})
        self.prior_weight = prior_weight
        self.start = start
        self.corrections: list[Correction] = []
        self.theta = nn.ParameterDict()

    def __len__(self) -> int:
        return len(self.spec)

    def bind(self, lattice, setting_names, settings: np.ndarray | None = None) -> None:
        """Check the mapping against the lattice (one clear error per problem) and make the parameters."""
        self.corrections = parse_corrections(self.spec, lattice, setting_names, settings=settings)
        for correction in self.corrections:
            key = _key(correction.name)
            if key not in self.theta or tuple(self.theta[key].shape) != correction.value0.shape:
                device = lattice_device(lattice)
                theta = torch.zeros(correction.value0.shape)
                if self.start == "random":  # init + step * N(0, 1): a draw of the prior where it has one
                    theta = torch.randn(correction.value0.shape)
                self.theta[key] = nn.Parameter(theta.to(device))
            self.register_buffer(f"init_{key}", torch.as_tensor(correction.value0), persistent=False)
            self.register_buffer(f"step_{key}", torch.as_tensor(correction.step), persistent=False)

    def values(self) -> list[torch.Tensor]:
        """The current calibrated values, one tensor per correction."""
        out = []
        for correction in self.corrections:
            key = _key(correction.name)
            theta = self.theta[key]
            init, step = getattr(self, f"init_{key}"), getattr(self, f"step_{key}")
            out.append(init.to(theta.dtype) + step.to(theta.dtype) * theta)
        return out

    def scalars(self) -> dict[str, torch.Tensor]:
        """{"calibration/<name>" (one value) or "calibration/<name>[i]": value} for logging."""
        out = {}
        for correction, value in zip(self.corrections, self.values()):
            flat = value.detach().flatten()
            for i, v in enumerate(flat):
                out[f"calibration/{correction.name}" + (f"[{i}]" if value.ndim else "")] = v
        return out

    def forward(self, values: dict[str, torch.Tensor], lattice) -> dict[str, torch.Tensor]:
        """Lattice settings with the calibration applied."""
        return apply_corrections(values, lattice, self.corrections, self.values())

    def prior_penalty(self) -> torch.Tensor | None:
        """prior_weight * 0.5 * sum of squared deviations from init in prior sigmas; None without priors."""
        terms = []
        for correction, value in zip(self.corrections, self.values()):
            if correction.prior_sigma is not None:
                sigma = torch.as_tensor(correction.prior_sigma, dtype=value.dtype, device=value.device)
                init = torch.as_tensor(correction.value0, dtype=value.dtype, device=value.device)
                terms.append((((value - init) / sigma) ** 2).sum())
        return self.prior_weight * 0.5 * torch.stack(terms).sum() if terms else None

    def report(self) -> dict:
        """{name: {kind, init, value[, prior_sigma]}} for calibration.json (plain numbers and lists)."""
        out = {}
        for correction, value in zip(self.corrections, self.values()):
            row = {"kind": correction.kind, "init": correction.value0.tolist(),
                   "value": value.detach().double().cpu().numpy().tolist()}
            if correction.prior_sigma is not None:
                row["prior_sigma"] = correction.prior_sigma.tolist()
            out[correction.name] = row
        return out


def lattice_device(lattice) -> torch.device:
    tensors = list(lattice.buffers()) + list(lattice.parameters())
    return tensors[0].device if tensors else torch.device("cpu")
