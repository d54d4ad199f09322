"""Base class of lattice elements: named tensor parameters that broadcast over settings."""

import torch
from torch import nn


class Element(nn.Module):
    """A lattice element with named parameters.

    Subclasses list their parameters and defaults in `parameters` (name -> default). Each parameter
    is a tensor of any shape (its shape is the settings shape it contributes); an `nn.Parameter`
    given to the constructor stays trainable. `overrides` passed at tracking time replace stored
    values (that is how scan settings enter).
    """

    parameters_defaults: dict[str, object] = {}
    non_negative: tuple[str, ...] = ("length",)

    def __init__(self, name: str | None = None, **values):
        super().__init__()
        self.name = name or type(self).__name__
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

    def to_dict(self) -> dict:
        """The lattice-file entry of this element."""
        entry = {"type": type(self).__name__, "name": self.name}
        for key in self.parameters_defaults:
            value = getattr(self, key).detach().cpu()
            entry[key] = value.item() if value.ndim == 0 else value.tolist()
        return entry

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


class LinearElement(Element):
    """An element whose effect on the beam is a 6x6 transfer matrix."""

    def transfer_map(self, p0c: float, species, like: torch.Tensor, overrides: dict | None = None) -> torch.Tensor:
        """Transfer matrix (..., 6, 6) in Bmad coordinates; `...` is the settings shape."""
        raise NotImplementedError


def eye_like(shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """Identity matrices (*shape, 6, 6) in `like`'s dtype and device."""
    return torch.eye(6, dtype=like.dtype, device=like.device).expand(*shape, 6, 6).clone()
