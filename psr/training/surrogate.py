"""`psr surrogate`: train a neural element (models/elements.py) on a pairs file (psr.data.pairs).

The loss compares the element's output beams with the reference physics' output beams of the same input
beams: particle by particle (the pairs are matched: mean squared difference in units of each reference
beam's rms, or with `whiten` in each plane's normalized phase space, where an error counts as it changes the
plane's emittance), as distributions (sliced Wasserstein-2 distance over random directions of the same
coordinates: shape, tails, correlations) and by their rms sizes (relative error). Validation reports the
rms sizes and emittances of held-out beams against the reference.
"""

import math

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

import sim
from models.elements import NEURAL_ELEMENT_TYPES, section_setting_key
from psr.data.pairs import read_pairs_files

RMS_KEYS = ("x", "px", "y", "py", "z", "pz")


class _Batches(IterableDataset):
    """`steps` batches of `beams` random training beams with `particles` random particles each."""

    def __init__(self, module: "PairsDataModule", steps: int):
        self.module, self.steps = module, steps

    def __len__(self):
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            yield self.module.random_batch()


class PairsDataModule(L.LightningDataModule):
    """Beams of a pairs file (or of several files of one section, settings, bunch and particle count, e.g. a
    synthetic range and beams fits visited): every `val_every`-th beam of each file held out; training batches
    of `beams_per_batch` random beams with `particles_per_beam` random particles each (all when None)."""

    def __init__(self, path: str | list[str], val_every: int = 5, beams_per_batch: int = 8,
                 particles_per_beam: int | None = 4000, steps_per_epoch: int = 100, seed: int = 0):
        super().__init__()
        if val_every < 2:
            raise ValueError(f"data.val_every must be >= 2 (every val_every-th beam is held out), got {val_every}")
        self.path, self.val_every, self.beams_per_batch = path, val_every, beams_per_batch
        self.particles_per_beam, self.steps_per_epoch = particles_per_beam, steps_per_epoch
        self.generator = torch.Generator().manual_seed(seed)
        self.pairs = None

    def setup(self, stage: str | None = None):
        if self.pairs is None:
            self.pairs, parts = read_pairs_files(self.path)
            m = self.pairs.beams_in.shape[0]
            held = [start + np.arange(self.val_every - 1, count, self.val_every) for start, count in parts]
            self.val_index = np.concatenate(held)
            self.train_index = np.setdiff1d(np.arange(m), self.val_index)
            if len(self.train_index) == 0 or len(self.val_index) == 0:
                raise ValueError(f"{self.path}: {m} beams leave no training or no held-out beams with val_every "
                                 f"{self.val_every}")
            self.beams_in = torch.as_tensor(self.pairs.beams_in)
            self.beams_out = torch.as_tensor(self.pairs.beams_out)
            self.settings = torch.as_tensor(self.pairs.settings)

    def random_batch(self) -> dict:
        beams = torch.as_tensor(self.train_index)[torch.randperm(len(self.train_index), generator=self.generator)
                                                  [:self.beams_per_batch]]
        n = self.beams_in.shape[1]
        take = n if self.particles_per_beam is None else min(self.particles_per_beam, n)
        particles = torch.randperm(n, generator=self.generator)[:take]
        return {"beams_in": self.beams_in[beams][:, particles], "beams_out": self.beams_out[beams][:, particles],
                "settings": self.settings[beams]}

    def held_out(self) -> dict:
        index = torch.as_tensor(self.val_index)
        return {"beams_in": self.beams_in[index], "beams_out": self.beams_out[index], "settings": self.settings[index]}

    def train_dataloader(self):
        return DataLoader(_Batches(self, self.steps_per_epoch), batch_size=None)

    def val_dataloader(self):
        return DataLoader([self.held_out()], batch_size=None)


def rms(particles: torch.Tensor) -> torch.Tensor:
    """(..., 6) rms sizes of particles (..., N, 6) (the variance clamped at 1e-30: no NaN gradient at 0)."""
    return (particles - particles.mean(-2, keepdim=True)).square().mean(-2).clamp_min(1e-30).sqrt()


def used_coordinates(beams_in: torch.Tensor) -> torch.Tensor:
    """(6,) mask of the coordinates the input beams (B, N, 6) have (z, pz of 4D beams are all 0: not trained)."""
    return rms(beams_in).amax(0) > 1e-15


def emittances(particles: torch.Tensor) -> torch.Tensor:
    """(..., 3) geometric rms emittances of the x, y, z planes of particles (..., N, 6)."""
    centred = particles - particles.mean(-2, keepdim=True)
    cov = centred.transpose(-1, -2) @ centred / particles.shape[-2]
    planes = [cov[..., 2 * i:2 * i + 2, 2 * i:2 * i + 2] for i in range(3)]
    return torch.stack([torch.linalg.det(p).clamp_min(0).sqrt() for p in planes], -1)


def normalized(particles: torch.Tensor, reference: torch.Tensor, used: torch.Tensor,
               whiten: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Particles and reference particles (B, N, 6) in the reference beam's coordinates, centred on its mean, of the
    `used` (6,) coordinates only (B, N, U): per rms, or with `whiten` per plane in its normalized phase space
    where both of the plane's coordinates are used: (u, (u' - r u) / sqrt(1 - r^2)) of the per-rms u, u' with r
    their correlation in the reference (the Cholesky factor of its 2x2 covariance inverted: a map's error then
    counts as it changes the plane's emittance, whatever the plane's x-px correlation)."""
    mean = reference.mean(-2, keepdim=True)
    size = rms(reference).unsqueeze(-2)
    a, b = (particles - mean) / size, (reference - mean) / size
    if whiten:
        columns = [list(a.unbind(-1)), list(b.unbind(-1))]
        for i in (0, 2, 4):
            if bool(used[i]) and bool(used[i + 1]):
                r = (columns[1][i] * columns[1][i + 1]).mean(-1, keepdim=True)  # b has unit variances
                across = (1 - r.square()).clamp_min(1e-12).sqrt()
                for part in columns:
                    part[i + 1] = (part[i + 1] - r * part[i]) / across
        a, b = (torch.stack(part, -1) for part in columns)
    return a[..., used], b[..., used]


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, directions: int, generator=None) -> torch.Tensor:
    """Mean over `directions` random unit directions of the squared 1D Wasserstein-2 distance between the
    projections of point clouds a, b (..., N, D) (same N): sorted projections compared rank by rank."""
    d = torch.randn(a.shape[-1], directions, dtype=a.dtype, device=a.device, generator=generator)
    d = d / d.norm(dim=0, keepdim=True)
    pa, pb = (a @ d).sort(-2).values, (b @ d).sort(-2).values
    return (pa - pb).square().mean()


class SurrogateTraining(L.LightningModule):
    """Train a neural element on a pairs file.

    element: the element's lattice entry without weights, e.g. {type: SectionMap, name: D1, hidden_width: 64}
    (a SectionMap's `section` and `inputs` default to the pairs file's lattice and settings, its
    `reference_rms` to the mean rms of the input beams; `input_scales` to the settings' largest |value|). weights: where the trained weights file is written (also copied into the run folder).
    particle_weight, distribution_weight, moment_weight: the three terms of the loss (module docstring);
    emittance_weight: a fourth, the relative error of the x and y emittances squared (default off);
    directions: random directions of the sliced Wasserstein distance. whiten: the particle and distribution terms
    in each plane's normalized phase space (`normalized`) rather than per rms. lr: Adam, cosine decay to
    lr * lr_final_fraction.
    """

    def __init__(self, element: dict, weights: str, lr: float = 1e-3, lr_final_fraction: float = 0.01,
                 particle_weight: float = 1.0, distribution_weight: float = 1.0, moment_weight: float = 1.0,
                 directions: int = 32, emittance_weight: float = 0.0, whiten: bool = False):
        super().__init__()
        if not isinstance(element, dict) or element.get("type") not in NEURAL_ELEMENT_TYPES:
            raise ValueError(f"model.element must be a neural element's entry with a type of "
                             f"{sorted(NEURAL_ELEMENT_TYPES)}, got {element!r}")
        if "weights" in element:
            raise ValueError("model.element: give the output file as model.weights, not element.weights")
        if not lr > 0:
            raise ValueError(f"model.lr must be positive, got {lr}")
        self.save_hyperparameters()
        self.element = None

    def configure_pairs(self, pairs) -> None:
        """Build the element for the pairs file's section, bunch and settings (before the optimizer)."""
        entry = dict(self.hparams.element)
        kind = entry.pop("type")
        entry.setdefault("name", kind)
        if pairs.settings.shape[1]:  # settings enter the network as value / scale: of order 1
            scales = np.abs(pairs.settings).max(0)
            entry.setdefault("input_scales", [float(v) if v > 0 else 1.0 for v in scales])
        if kind == "SectionMap":
            entry.setdefault("section", pairs.lattice)
            entry.setdefault("inputs", list(pairs.setting_names))
            if isinstance(entry.get("space_charge"), dict):  # linear space charge of the pairs' bunch charge
                entry["space_charge"] = {"charge": float(pairs.charge), **entry["space_charge"]}
            entry.setdefault("reference_rms", [float(v) for v in rms(torch.as_tensor(pairs.beams_in, dtype=torch.float64))
                                               .mean(0).clamp_min(1e-12)])
        self.element = NEURAL_ELEMENT_TYPES[kind](**entry)
        parameters = getattr(self.element, "parameters_defaults", {})
        if kind == "SectionMap":  # the section's "Q1.k1" is the map's "Q1_k1"
            own = [section_setting_key(n) for n in pairs.setting_names]
        else:  # a ResidualElement replaces a one-element section: its settings are the element's
            own = [n.rpartition(".")[2] for n in pairs.setting_names]
        unknown = [n for n, o in zip(pairs.setting_names, own) if o not in parameters]
        if unknown:
            raise ValueError(f"{self.trainer.datamodule.path if self._trainer else 'pairs'}: settings {unknown} are "
                             f"not settings of the {kind} {self.element.name} (its settings: {sorted(parameters)})")
        self.setting_keys = own
        self.p0c, self.species = pairs.p0c, sim.get_species(pairs.species)

    def setup(self, stage: str) -> None:
        if self.element is None:
            self.configure_pairs(self.trainer.datamodule.pairs)

    def forward(self, beams_in: torch.Tensor, settings: torch.Tensor) -> torch.Tensor:
        """Output beams (B, N, 6) of input beams (B, N, 6) at settings (B, P)."""
        overrides = {key: settings[:, i].to(beams_in.dtype) for i, key in enumerate(self.setting_keys)}
        return self.element.track(beams_in, self.p0c, self.species, overrides or None)[0]

    def losses(self, batch) -> dict[str, torch.Tensor]:
        predicted = self(batch["beams_in"], batch["settings"])
        reference = batch["beams_out"]
        used = used_coordinates(batch["beams_in"])
        a, b = normalized(predicted, reference, used, self.hparams.whiten)
        terms = {"particle": (a - b).square().mean(),
                 "distribution": sliced_wasserstein(a, b, self.hparams.directions),
                 "moment": (rms(predicted)[..., used] / rms(reference)[..., used] - 1).square().mean()}
        if self.hparams.emittance_weight:
            ratio = emittances(predicted)[..., :2] / emittances(reference)[..., :2].clamp_min(1e-30)
            terms["emittance"] = (ratio - 1).square().mean()
        return terms

    def training_step(self, batch, batch_idx):
        terms = self.losses(batch)
        h = self.hparams
        loss = h.particle_weight * terms["particle"] + h.distribution_weight * terms["distribution"] \
            + h.moment_weight * terms["moment"] + h.emittance_weight * terms.get("emittance", 0.0)
        self.log("train_loss", loss, prog_bar=True)
        self.log_dict({f"train_{k}": v for k, v in terms.items()})
        return loss

    def validation_step(self, batch, batch_idx):
        errors = self.moment_errors(batch)
        used = used_coordinates(batch["beams_in"])
        self.log("val_rms_error", errors["rms"][..., used].abs().max(), prog_bar=True)
        self.log("val_emittance_error", errors["emittance"].abs().max(), prog_bar=True)

    @torch.no_grad()
    def moment_errors(self, batch) -> dict[str, torch.Tensor]:
        """Relative errors (B, 6) of the rms sizes and (B, 2) of the x, y emittances of the predicted beams."""
        predicted = self(batch["beams_in"], batch["settings"])
        reference = batch["beams_out"]
        return {"rms": rms(predicted) / rms(reference).clamp_min(1e-30) - 1,
                "emittance": emittances(predicted)[..., :2] / emittances(reference)[..., :2].clamp_min(1e-30) - 1,
                "predicted": predicted, "reference": reference}

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        steps = max(int(self.trainer.estimated_stepping_batches), 1)
        final = self.hparams.lr_final_fraction

        def factor(step: int) -> float:
            return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))

        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "interval": "step"}}
