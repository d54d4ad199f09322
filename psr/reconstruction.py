"""LightningModule: fit a generative beam model to measured screen images through the lattice."""

import math

import lightning as L
import torch
from torch import nn

import sim

LOSSES = ("l1", "mse")


def image_loss(predicted: torch.Tensor, measured: torch.Tensor, kind: str) -> torch.Tensor:
    """Mismatch of unit-sum images (B, H, W), averaged over the B images.

    "l1": sum of |difference| per image (0 for a perfect match, 2 for disjoint images), averaged.
    "mse": sum of squared differences per image times the pixel count, averaged.
    """
    diff = predicted - measured
    if diff.shape[0] == 0:
        return predicted.new_zeros(())
    if kind == "l1":
        per_image = diff.abs().sum(dim=(-1, -2))
    else:
        per_image = diff.square().sum(dim=(-1, -2)) * diff.shape[-1] * diff.shape[-2]
    return per_image.mean()


class PhaseSpaceReconstruction(L.LightningModule):
    """Reconstruct a beam: generator -> particles -> lattice at every setting -> images -> loss.

    generator: a module returning particles (N, 6) (e.g. models.MLPBeamGenerator).
    lr: Adam learning rate, reached linearly over `warmup_steps` (large early Adam steps can throw
    the beam off the screens, where no gradient brings it back), then decayed along a cosine to
    lr * lr_final_fraction by the last step. loss: "l1" or "mse" image mismatch. The lattice, p0c and species come
    from the data module's scan file at setup. tracking: per-element tracking methods that replace
    the scan file's, e.g. {"B1": "linear", "TDC": "linear"} to model the beamline with its
    (faster, first-order) transfer maps. space_charge: {"grid_shape": [nx, ny, nz], "max_step": metres, "extent": k}
    tracks with 3D space charge (`sim.SpaceCharge`) of the scan file's bunch charge; None: off.
    """

    def __init__(self, generator: nn.Module, lr: float = 1e-2, lr_final_fraction: float = 0.01,
                 warmup_steps: int = 100, loss: str = "l1", tracking: dict[str, str] | None = None,
                 space_charge: dict | None = None):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; use one of {LOSSES}")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not 0 < lr_final_fraction <= 1:
            raise ValueError(f"lr_final_fraction must be in (0, 1], got {lr_final_fraction}")
        sim.SpaceCharge.from_config(space_charge, "model.space_charge")  # checks the settings now
        self.save_hyperparameters(ignore=["generator"])
        self.generator = generator
        self.lattice: sim.Lattice | None = None
        self.setting_names: list[str] = []

    def configure_scan(self, scan) -> None:
        """Take the lattice, reference and setting names from a scan file (`psr.scanfile.ScanData`)."""
        items = [dict(item) for item in scan.lattice]
        names = [item.get("name") for item in items]
        for name, method in (self.hparams.tracking or {}).items():
            if name not in names:
                raise ValueError(f"model.tracking names element {name!r}, which is not in the lattice; elements: {names}")
            items[names.index(name)]["tracking"] = method
        space_charge = sim.SpaceCharge.from_config(self.hparams.space_charge, "model.space_charge")
        if space_charge is not None and not scan.charge > 0:
            raise ValueError("model.space_charge is set, but the scan file's bunch charge is 0")
        self.lattice = sim.Lattice.from_list(items, space_charge=space_charge).to(self.device)
        self.p0c, self.species, self.charge = scan.p0c, scan.species, scan.charge
        self.setting_names = list(scan.setting_names)

    def setup(self, stage: str) -> None:
        if self.lattice is None:
            datamodule = getattr(self.trainer, "datamodule", None)
            if datamodule is None or getattr(datamodule, "scan", None) is None:
                raise RuntimeError("PhaseSpaceReconstruction needs a ScanDataModule (it builds the lattice from the scan file)")
            self.configure_scan(datamodule.scan)

    def beam(self, n_particles: int | None = None) -> sim.ParticleBeam:
        """The current reconstructed beam."""
        return sim.ParticleBeam(self.generator(n_particles), self.p0c, self.species, self.charge)

    def predict_images(self, settings: torch.Tensor, beam: sim.ParticleBeam | None = None,
                       measured: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Images (B, H, W) of every screen for settings (B, P); with `measured` ({screen: (B,) flags})
        only the images of the measured settings, (M, H, W) per screen."""
        beam = beam if beam is not None else self.beam()
        values = {name: settings[:, i].to(beam.particles.dtype) for i, name in enumerate(self.setting_names)}
        return self.lattice(beam, values, screen_rows=measured).images

    def _loss(self, batch) -> torch.Tensor:
        measured = batch["measured"]
        predicted = self.predict_images(batch["settings"], measured=measured)
        losses = [image_loss(predicted[name], batch["images"][name][measured[name]], self.hparams.loss)
                  for name in batch["images"]]
        return torch.stack(losses).mean()

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("val_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        steps = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup, final = self.hparams.warmup_steps, self.hparams.lr_final_fraction

        def factor(step: int) -> float:
            cosine = final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
            return min(1.0, (step + 1) / warmup) * cosine if warmup else cosine

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
