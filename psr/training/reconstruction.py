"""LightningModule: fit a generative beam model to measured screen images through the lattice."""

import math

import numpy as np

import lightning as L
import torch
from torch import nn

import sim
from models import GaussianBeam, as_particles
from models.lagged import LaggedSpaceCharge
from psr.data.lattices import build_lattice
from psr.training.alignment import centre_on, centred_screens
from psr.training.calibration import Calibration
from psr.training.replace import replace_sections
from psr.training.moments import MeasuredMoments, moment_mismatch
from psr.training.prior import derive_auto_prior
from psr.training.warm_start import load_generator_weights

LOSSES = ("l1", "mse")


def scan_summary(scan, items: list[dict]) -> dict:
    """What a trained model needs of its scan file to predict at new settings (`psr predict`): the lattice
    entries as tracked (after replacements), setting names, upstream names and the range of every setting."""
    from psr.data.scanfile import _plain

    settings = scan.settings
    return {"lattice": _plain(items), "setting_names": list(scan.setting_names),
            "upstream": list(getattr(scan, "upstream", None) or []), "p0c": float(scan.p0c), "species": scan.species,
            "charge": float(scan.charge), "folder": getattr(scan, "folder", None),
            "low": settings.min(0).tolist(), "high": settings.max(0).tolist()}


def image_loss(predicted: torch.Tensor, measured: torch.Tensor, kind: str, pyramid: int = 0) -> torch.Tensor:
    """Mismatch of unit-sum images (B, H, W), averaged over the B images.

    "l1": sum of |difference| per image (0 for a perfect match, 2 for disjoint images), averaged.
    "mse": sum of squared differences per image times the pixel count, averaged.
    pyramid: also compare the images summed over 2x2, 4x4, ... 2^pyramid x 2^pyramid pixel blocks, and
    average the pyramid+1 mismatches. Where a beam's tails are faint and wide, a model's few tail
    particles land alone in pixels, and |difference| per pixel is then noise without a pull towards the
    measured tail; in coarse blocks the tails hold many particles, so the mismatch sees and pulls them.
    """
    diff = predicted - measured
    if diff.shape[0] == 0:
        return predicted.new_zeros(())
    levels = [diff]
    for _ in range(pyramid):
        if min(levels[-1].shape[-2:]) < 4:
            break
        block_sums = torch.nn.functional.avg_pool2d(levels[-1].unsqueeze(1), 2, ceil_mode=True, divisor_override=1)
        levels.append(block_sums.squeeze(1))
    per_image = 0
    for level in levels:
        if kind == "l1":
            per_image = per_image + level.abs().sum(dim=(-1, -2))
        else:
            per_image = per_image + level.square().sum(dim=(-1, -2)) * level.shape[-1] * level.shape[-2]
    return per_image.mean() / len(levels)


def draws_fresh_particles(generator: nn.Module) -> bool:
    """Whether a generator gives other particles every training step (resample, or no fixed base samples)."""
    return not hasattr(generator, "base_samples") or bool(getattr(generator, "resample", False))


MOMENT_RAMP = 0.1  # the moment term rises to its weight over this fraction of the training steps


class PhaseSpaceReconstruction(L.LightningModule):
    """Reconstruct a beam: generator -> particles -> lattice at every setting -> images -> loss.

    generator: a module returning particles (N, 6) (e.g. models.MLPBeamGenerator).
    lr: Adam learning rate, reached linearly over `warmup_steps` (large early Adam steps can throw
    the beam off the screens, where no gradient brings it back), then decayed along a cosine to
    lr * lr_final_fraction by the last step. loss: "l1" or "mse" image mismatch; moment_weight: weight of
    `moment_mismatch` (each image's rms sizes and centroid) added to it (0: images only); moment_start: the
    fraction of the training steps fitted to the images alone before the moment term comes in (rising to its
    weight over the next tenth of them), so the images shape the core before the moments ask for tails (an
    S-shaped beam's image l1 0.048 instead of 0.055 at the same emittances); moment_kurtosis:
    that term also compares the kurtosis of each image's x and y projections (the tails' shape, which
    decides core emittances: a hollow beam's came out 6-8 % low without it); moment_mean_abs: it also compares
    their mean absolute deviation over rms size (`psr.training.moments.projection_mean_abs`: the shape with far less
    of the far particles' noise); pyramid: coarser
    levels of the image comparison (`image_loss`). The lattice, p0c and species come
    from the data module's scan file at setup. tracking: per-element tracking methods that replace
    the scan file's, e.g. {"B1": "linear", "TDC": "linear"} to model the beamline with its
    (faster, first-order) transfer maps. space_charge: {"grid_shape": [nx, ny, nz], "max_step": metres, "extent": k}
    tracks with 3D space charge (`sim.SpaceCharge`) of the scan file's bunch charge ({"solver": "gaussian",
    "max_step": metres}: the rms-equivalent Gaussian ellipsoid's field, no grid); None: off. space_charge_every:
    k > 1 computes the kicks every k-th training step and holds each particle's kicks in between
    (`models.lagged`: the fit lands where PIC fits the images at about the cost of tracking without it), or, for
    a generator that draws fresh particles every step (resample), PIC's field grid, interpolated at each step's
    particles (the PIC solver only); 1: every step. Without space charge it has no effect. report_particles: the
    particles of beam.h5, the report (emittances, plots) and `psr predict`'s default beam: None, the generator's
    own samples; N, a draw of N (for a generator trained on fresh draws every step its own samples are one draw
    like any other, and the reported emittance is then that of the network's distribution, not of one draw's tail).

    Maximum entropy (MENT-Flow's penalty method, Hoover & Wong, Phys. Rev. Research 6, 033163 (2024)):
    with `entropy_penalty` = mu (> 0) the objective is -H[rho, prior] + mu * D, D the image mismatch
    and H[rho, prior] = -E_rho[log rho - log prior] [nats] estimated from the generator's own
    log-density (a `models.NormalizingFlowBeam` or `models.GaussianBeam`). prior: a module with
    `log_density(x)` over the generator's coordinates (e.g. a fixed `models.GaussianBeam`); None: a
    flat prior (plain entropy); "auto": derived from the training images at setup
    (`psr.training.prior`): the Gaussian whose mean and covariance reproduce the images' centroids and
    second moments through the linearized lattice, widened by `prior_width` in every rms size, is the
    prior, and the unwidened one sets the generator's normalization (a flow's mean and Cholesky
    factor, replacing its `scale`/`covariance`/`mean`) so it starts at the beam's scale. The callback
    `psr.training.PenaltySchedule` raises mu stage by stage until D falls under a threshold.
    "train_loss" stays the image mismatch D; the objective is logged as "train_objective", the
    entropy as "entropy" and mu as "penalty".

    calibrate: machine parameters fitted with the beam (DESIGN.md "Calibration"), e.g.
    {"Q1.k1": {"kind": "scale", "init": 1.0, "prior_sigma": 0.05}, "YAG.center": {"kind": "offset"}}
    (`psr.training.calibration`); an optional `step` per entry is the value's unit of change in the fit.
    calibration_prior_weight: what the Gaussian priors cost against the image mismatch (one sigma:
    half of it); the penalty is logged as "calibration_prior". calibration_start: "init", or "random":
    start at init + step * N(0, 1) (a draw of the prior where it has one; `psr ensemble` members do, so
    their spread shows what the data leave undetermined). replace: sections of the scan's lattice tracked by
    neural elements instead (`psr.training.replace`), e.g. [{elements: [Q1, D1], element: {type: SectionMap,
    name: SC, inputs: [Q1.k1], weights: data/sc_section.pt}}]: a surrogate of their space charge; an entry's
    `correct: {every: 20, space_charge: {...}}` corrects it by PIC every 20 steps (`models.corrected`).
    init_from: a checkpoint (.ckpt) or run folder of an earlier fit whose generator weights this fit starts from
    (`psr.training.warm_start`; same generator, any particle count; not its optimizer, schedule or calibration).
    """

    def __init__(self, generator: nn.Module, lr: float = 1e-2, lr_final_fraction: float = 0.01,
                 warmup_steps: int = 100, loss: str = "l1", tracking: dict[str, str] | None = None,
                 space_charge: dict | None = None, entropy_penalty: float | None = None,
                 prior: nn.Module | str | None = None, prior_width: float = 1.5, moment_weight: float = 0.0,
                 moment_kurtosis: bool = False, moment_mean_abs: bool = False, pyramid: int = 0,
                 calibrate: dict[str, dict] | None = None,
                 calibration_prior_weight: float = 0.01, calibration_start: str = "init",
                 replace: list[dict] | None = None, init_from: str | None = None, space_charge_every: int = 1,
                 moment_start: float = 0.0, report_particles: int | None = None):
        super().__init__()
        if report_particles is not None and not (isinstance(report_particles, int) and not isinstance(report_particles, bool)
                                                 and report_particles >= 2):
            raise ValueError(f"model.report_particles must be a whole number of particles >= 2 or null, got {report_particles!r}")
        if calibrate is not None and not isinstance(calibrate, dict):
            raise ValueError(f"model.calibrate must be a mapping from '<element>.<parameter>' to {{kind: scale | offset, "
                             f"init: ...}}, got {calibrate!r}")
        if not (isinstance(calibration_prior_weight, (int, float)) and calibration_prior_weight >= 0):
            raise ValueError(f"model.calibration_prior_weight must be a number >= 0, got {calibration_prior_weight!r}")
        if not (isinstance(moment_weight, (int, float)) and math.isfinite(moment_weight) and moment_weight >= 0):
            raise ValueError(f"model.moment_weight must be a number >= 0, got {moment_weight!r}")
        if not (isinstance(moment_start, (int, float)) and not isinstance(moment_start, bool) and 0 <= moment_start < 1):
            raise ValueError(f"model.moment_start must be a fraction of the training steps from 0 to below 1, "
                             f"got {moment_start!r}")
        for option, value in (("moment_kurtosis", moment_kurtosis), ("moment_mean_abs", moment_mean_abs)):
            if not isinstance(value, bool) or (value and not moment_weight):
                raise ValueError(f"model.{option} must be true or false and, when true, needs model.moment_weight > 0 "
                                 f"(it is part of the moment term), got {value!r} with weight {moment_weight!r}")
        if not (isinstance(pyramid, int) and 0 <= pyramid <= 8):
            raise ValueError(f"model.pyramid must be an integer from 0 to 8, got {pyramid!r}")
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; use one of {LOSSES}")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not 0 < lr_final_fraction <= 1:
            raise ValueError(f"lr_final_fraction must be in (0, 1], got {lr_final_fraction}")
        sim.SpaceCharge.from_config(space_charge, "model.space_charge")  # checks the settings now
        if not (isinstance(space_charge_every, int) and not isinstance(space_charge_every, bool) and space_charge_every >= 1):
            raise ValueError(f"model.space_charge_every must be a whole number of training steps >= 1, got {space_charge_every!r}")
        if entropy_penalty is not None:
            if not entropy_penalty > 0:
                raise ValueError(f"model.entropy_penalty must be positive (or null for a plain fit), got {entropy_penalty}")
            if not hasattr(generator, "sample_with_log_density"):
                raise ValueError(f"model.entropy_penalty needs a generator with a log-density (models.NormalizingFlowBeam "
                                 f"or models.GaussianBeam); {type(generator).__name__} has none")
        self.auto_prior = isinstance(prior, str)
        if self.auto_prior:
            if prior != "auto":
                raise ValueError(f"model.prior must be a module, \"auto\" or null, got {prior!r}")
            if not prior_width > 0:
                raise ValueError(f"model.prior_width must be positive, got {prior_width}")
            prior = GaussianBeam(n_particles=2, n_dim=getattr(generator, "n_dim", 6))  # set at setup
        if prior is not None:
            if entropy_penalty is None:
                raise ValueError("model.prior is only used with model.entropy_penalty (maximum entropy)")
            if not hasattr(prior, "log_density"):
                raise ValueError(f"model.prior must have log_density(x); {type(prior).__name__} has none")
            if getattr(prior, "n_dim", None) != getattr(generator, "n_dim", None):
                raise ValueError(f"model.prior has n_dim {getattr(prior, 'n_dim', None)}, the generator "
                                 f"{getattr(generator, 'n_dim', None)}")
            prior.requires_grad_(False)
        corrected = [f"model.replace[{i}].correct" for i, entry in enumerate(replace or [])
                     if isinstance(entry, dict) and entry.get("correct") is not None]
        fresh = draws_fresh_particles(generator)
        pic = isinstance(space_charge, dict) and space_charge.get("solver", "pic") == "pic"
        if space_charge_every > 1 and space_charge is not None and not (fresh and pic):
            corrected.insert(0, f"model.space_charge_every {space_charge_every}")  # fresh particles: the field is held
        if corrected and fresh:
            raise ValueError(f"{corrected[0]} holds a correction per particle from one step to the "
                             f"next: it needs a generator that gives the same particles every step (fixed base samples, "
                             f"as models.MLPBeamGenerator), not {type(generator).__name__}"
                             + (" with resample" if getattr(generator, "resample", False) else "")
                             + ("; with the PIC solver it holds the field grid instead" if "every" in corrected[0] else ""))
        self.save_hyperparameters(ignore=["generator", "prior"])
        if init_from is not None and self.auto_prior:
            raise ValueError("model.init_from with model.prior auto: deriving the prior resets the generator's normalization "
                             "(the warm start's); give model.prior as a module, or start without model.init_from")
        if init_from is not None:  # a warm start: the generator's weights of an earlier fit (not its optimizer)
            source, kept = load_generator_weights(generator, init_from)
            print(f"generator starts from {source}" + (f" ({', '.join(kept)} as initialized: not in it)" if kept else ""))
        self.generator = generator
        self.prior = prior
        self.calibration = Calibration(calibrate, calibration_prior_weight, calibration_start)
        self.register_buffer("penalty", torch.tensor(float(entropy_penalty or 0.0), dtype=torch.float64))
        if self.auto_prior:  # saved with checkpoints: a restored model keeps the prior it was fitted with
            self.register_buffer("prior_derived", torch.tensor(False))
        self.lattice: sim.Lattice | None = None
        self.setting_names: list[str] = []
        self.setting_routes: dict[str, str] = {}  # scan settings taken by a neural element that replaced a section
        self.upstream: list[str] = []  # upstream settings (DESIGN.md "Conditional beams"): the generator's inputs
        self.scan_summary: dict | None = None  # what `psr predict` needs of the scan file (saved with checkpoints)
        self.centred: set[str] = set()  # screens centred at import (align: settings): centroids ignored
        self._measured_moments: dict = {}  # (screen, training): MeasuredMoments of its measured images (moment term)

    def configure_scan(self, scan) -> None:
        """Take the lattice, reference and setting names from a scan file (`psr.data.scanfile.ScanData`)."""
        items = [dict(item) for item in scan.lattice]
        names = [item.get("name") for item in items]
        for name, method in (self.hparams.tracking or {}).items():
            if name not in names:
                raise ValueError(f"model.tracking names element {name!r}, which is not in the lattice; elements: {names}")
            items[names.index(name)]["tracking"] = method
        if self.hparams.space_charge is not None and not scan.charge > 0:
            raise ValueError("model.space_charge is set, but the scan file's bunch charge is 0")
        items, routes = replace_sections(items, self.hparams.get("replace"), scan.setting_names, scan.charge)
        summary = scan_summary(scan, items)
        summary["routes"], summary["centred"] = routes, sorted(centred_screens(scan))
        self.configure_summary(summary)

    def configure_summary(self, summary: dict) -> None:
        """Build the lattice, calibration and conditions from a scan summary (`scan_summary`; saved with every
        checkpoint, so a trained run predicts without its scan file: `psr predict`)."""
        space_charge = sim.SpaceCharge.from_config(self.hparams.space_charge, "model.space_charge")
        if space_charge is not None and self.hparams.get("space_charge_every", 1) > 1:
            hold = "field" if draws_fresh_particles(self.generator) else "kicks"
            space_charge = LaggedSpaceCharge.lagging(space_charge, self.hparams.space_charge_every, hold)
        self.lattice = build_lattice(summary["lattice"], summary.get("folder"), space_charge).to(self.device)
        # neural elements (a surrogate from model.replace, or in the scan's lattice) are fixed physics in a fit: the
        # optimizer would otherwise retrain them on the scan's images together with the beam, which lets the two
        # trade off (the shipped surrogate fit moved its element's sizes by up to 11 % against PIC that way)
        self.lattice.requires_grad_(False)
        self.setting_routes = dict(summary.get("routes") or {})
        self.p0c, self.species, self.charge = summary["p0c"], summary["species"], summary["charge"]
        self.setting_names = list(summary["setting_names"])
        self.upstream = list(summary.get("upstream") or [])
        ranges = np.array([summary["low"], summary["high"]], dtype=np.float64)  # what the defaults of steps need
        self._configure_conditions(ranges)
        lattice_columns = [i for i, name in enumerate(self.setting_names) if name not in self.upstream]
        self.calibration.bind(self.lattice, [self.setting_names[i] for i in lattice_columns], ranges[:, lattice_columns])
        self.centred = set(summary.get("centred") or [])
        self.scan_summary = summary

    def _configure_conditions(self, ranges: np.ndarray) -> None:
        """A conditional generator takes the scan file's upstream settings as inputs (their training range (2, P)
        from the file); a plain one cannot use them."""
        conditional = hasattr(self.generator, "configure_conditions")
        if self.upstream and not conditional:
            raise ValueError(f"the scan file has upstream settings {self.upstream} (the beam changes with them): "
                             f"model.generator must be a conditional beam model (models.ConditionalMLPBeam), got "
                             f"{type(self.generator).__name__}")
        if conditional and not self.upstream:
            raise ValueError(f"model.generator {type(self.generator).__name__} is a conditional beam model, but the scan "
                             "file lists no upstream settings (the /settings attribute upstream)")
        if conditional and not self.generator.configured:
            values = ranges[:, [self.setting_names.index(name) for name in self.upstream]]
            self.generator.configure_conditions(self.upstream, values.min(0), values.max(0))
            self.generator.to(self.device)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["psr_scan"] = self.scan_summary

    def upstream_columns(self) -> list[int]:
        return [self.setting_names.index(name) for name in self.upstream]

    def setup(self, stage: str) -> None:
        if self.lattice is None:
            datamodule = getattr(self.trainer, "datamodule", None)
            if datamodule is None or getattr(datamodule, "scan", None) is None:
                raise RuntimeError("PhaseSpaceReconstruction needs a ScanDataModule (it builds the lattice from the scan file)")
            self.configure_scan(datamodule.scan)
        if self.auto_prior and not bool(self.prior_derived):
            derive_auto_prior(self, self.trainer.datamodule)
            self.prior_derived.fill_(True)

    def report_beam(self) -> sim.ParticleBeam:
        """The beam of beam.h5 and the report (`report_particles`; at the centre of a conditional model's range)."""
        return self.beam(self.hparams.get("report_particles"))

    def beam(self, n_particles: int | None = None) -> sim.ParticleBeam:
        """The current reconstructed beam (of a conditional model: at the centre of its training range)."""
        if self.upstream:
            return sim.ParticleBeam(self.generator(None, n_particles), self.p0c, self.species, self.charge)
        return sim.ParticleBeam(self.generator(n_particles), self.p0c, self.species, self.charge)

    def beam_at(self, conditions: torch.Tensor, n_particles: int | None = None) -> sim.ParticleBeam:
        """A conditional model's beams (G, N, 6) at upstream settings (G, U) (columns in `self.upstream` order)."""
        return sim.ParticleBeam(self.generator(conditions, n_particles), self.p0c, self.species, self.charge)

    def _conditional_beam(self, settings: torch.Tensor) -> sim.ParticleBeam:
        """The beams (B, N, 6) at each of B settings' upstream values: generated once per distinct value."""
        conditions = settings[:, self.upstream_columns()]
        distinct, inverse = torch.unique(conditions, dim=0, return_inverse=True)
        beams = self.beam_at(distinct)
        return beams.with_particles(beams.particles[inverse])

    def predict_images(self, settings: torch.Tensor, beam: sim.ParticleBeam | None = None,
                       measured: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Images (B, H, W) of every screen for settings (B, P); with `measured` ({screen: (B,) flags})
        only the images of the measured settings, (M, H, W) per screen."""
        if self.upstream and (beam is None or beam.particles.ndim == 2):
            beam = self._conditional_beam(settings)
        beam = beam if beam is not None else self.beam()
        return self.lattice(beam, self.lattice_values(settings, beam.particles.dtype), screen_rows=measured).images

    def lattice_setting_names(self) -> list[str]:
        """The scan's setting names as the lattice takes them: those of a section a neural element replaced routed
        to it ("Q1.k1" -> "SC.Q1_k1")."""
        return [self.setting_routes.get(name, name) for name in self.setting_names]

    def lattice_values(self, settings: torch.Tensor, dtype: torch.dtype, route: bool = True) -> dict[str, torch.Tensor]:
        """The lattice's settings {name: (B,)} for scan settings (B, P): calibration applied, upstream settings
        left out, settings taken by a neural element routed to it (route False: under the scan's names)."""
        values = {name: settings[:, i].to(dtype) for i, name in enumerate(self.setting_names) if name not in self.upstream}
        values = self.calibration(values, self.lattice)
        return {(self.setting_routes.get(name, name) if route else name): value for name, value in values.items()}

    @torch.no_grad()
    def predict_at(self, settings: dict[str, torch.Tensor], n_particles: int | None = None):
        """The beams and images at R rows of settings {name: (R,) values}: upstream names set the conditional
        beam, the others the lattice (as in the fit: calibration applied; a scanned setting left out keeps the
        lattice's value). Returns (beam: particles (R, N, 6) or (N, 6) for a beam that no setting changes,
        images {screen: (R, H, W)})."""
        rows = len(next(iter(settings.values())))
        dtype = self.lattice_dtype()
        if self.upstream:
            conditions = torch.stack([torch.as_tensor(settings[n], dtype=dtype) for n in self.upstream], -1)
            beam = self.beam_at(conditions.to(self.device), n_particles)
        else:
            beam = self.beam(n_particles)
        values = {name: torch.as_tensor(v, dtype=dtype, device=self.device) for name, v in settings.items()
                  if name not in self.upstream}
        for name in self.setting_names:
            if name not in self.upstream and name not in values:
                element, parameter = sim.lattice.parse_setting_name(self.setting_routes.get(name, name))
                stored = getattr(self.lattice[element], parameter, None)
                if stored is None:  # a setting taken by a neural element: its nominal is the scan's middle
                    index = self.setting_names.index(name)
                    stored = torch.tensor(0.5 * (self.scan_summary["low"][index] + self.scan_summary["high"][index]))
                values[name] = torch.as_tensor(stored, dtype=dtype, device=self.device).expand(rows).clone()
        values = self.calibration({k: v.to(beam.particles.dtype) for k, v in values.items()}, self.lattice)
        values = {self.setting_routes.get(name, name): value for name, value in values.items()}
        return beam, self.lattice(beam, values).images

    def lattice_dtype(self) -> torch.dtype:
        tensors = list(self.generator.buffers()) + list(self.generator.parameters())
        return tensors[0].dtype if tensors else torch.float32

    @property
    def max_entropy(self) -> bool:
        return self.hparams.entropy_penalty is not None

    def relative_entropy(self, n_particles: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(particles (N, 6), H[rho, prior] [nats]): -mean(log rho - log prior) over the generator's
        own samples (the plain entropy in Bmad units without a prior)."""
        coords, log_density = self.generator.sample_with_log_density(n_particles)
        if self.prior is not None:
            log_density = log_density - self.prior.log_density(coords)
        return as_particles(coords), -log_density.mean()

    def _loss(self, batch, beam: sim.ParticleBeam | None = None, share: bool = False) -> torch.Tensor:
        """Image mismatch of a batch: per screen the mean over its measured images, then the mean over screens.

        share: fit together with the other processes of a distributed run (Lightning's ddp strategy):
        this process (global rank r of W) tracks only settings r, r + W, ... of the batch and returns its
        share of the mismatch (per screen, its images' sum over the screen's measured images in the
        whole batch), so the shares of all processes add up to the mismatch of the whole batch.
        """
        rank, world = self._rank_and_world() if share else (0, 1)
        rows = slice(rank, None, world)
        measured = {name: flags[rows] for name, flags in batch["measured"].items()}
        settings = batch["settings"][rows]
        predicted = self.predict_images(settings, beam, measured=measured) if len(settings) else {}
        losses = []
        for name, images in batch["images"].items():
            mine, total = int(measured[name].sum()), int(batch["measured"][name].sum())
            if mine == 0:
                losses.append(images.new_zeros(()))
                continue
            mine_images, mine_predicted = images[rows][measured[name]], predicted[name]
            if name in self.centred:  # the measured centroids carry no information: fit the shape only
                mine_predicted = centre_on(mine_predicted, mine_images)
            mean = self.screen_mismatch(name, mine_predicted, mine_images)
            losses.append(mean * (mine / total) if mine != total else mean)
        loss = torch.stack(losses).mean()
        if world > 1:  # DDP needs a gradient (0 where unused) for every parameter from every process
            loss = loss + sum(0.0 * p.sum() for p in self.parameters() if p.requires_grad)
        return loss

    def screen_mismatch(self, name: str, predicted: torch.Tensor, measured: torch.Tensor) -> torch.Tensor:
        """The mismatch of screen `name`'s predicted and measured unit-sum images (B, H, W), mean over B:
        the image loss plus moment_weight times the rms-moment mismatch."""
        mean = image_loss(predicted, measured, self.hparams.loss, self.hparams.get("pyramid", 0))
        weight = self.hparams.get("moment_weight", 0.0) * self._moment_factor()
        if weight:
            kurtosis, mean_abs = self.hparams.get("moment_kurtosis", False), self.hparams.get("moment_mean_abs", False)
            key = (name, self.training)  # training and validation images of a screen differ: one entry each
            cached = self._measured_moments.get(key)
            if cached is None or not cached.matches(measured, kurtosis, mean_abs):
                cached = self._measured_moments[key] = MeasuredMoments(measured, kurtosis, mean_abs)
            mean = mean + weight * moment_mismatch(predicted, cached, centroids=name not in self.centred,
                                                   kurtosis=kurtosis, mean_abs=mean_abs)
        return mean

    def _moment_factor(self) -> float:
        """The moment term's share of its weight: in training 0 until `moment_start` of the steps are done, then
        rising linearly to 1 over the next tenth of them; 1 in validation and outside a trainer."""
        start = self.hparams.get("moment_start", 0.0)
        if not start or not self.training or self._trainer is None:
            return 1.0
        done = self.global_step / max(int(self.trainer.estimated_stepping_batches), 1)
        return min(max((done - start) / MOMENT_RAMP, 0.0), 1.0)

    def _rank_and_world(self) -> tuple[int, int]:
        """(global rank, number of processes) of this process in its trainer; (0, 1) without one."""
        trainer = self._trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _sum_over_processes(self, share: torch.Tensor) -> torch.Tensor:
        """The sum of every process's `share` (a detached copy; the share itself in a single process)."""
        if self._rank_and_world()[1] == 1:
            return share.detach()
        return self.trainer.strategy.reduce(share.detach().clone(), reduce_op="sum")

    def _distributed(self, share: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        """A loss whose value is `total` (the sum of the shares) and whose gradient is W x the gradient of this
        process's `share`: DDP averages the W processes' gradients, which gives the gradient of the total."""
        world = self._rank_and_world()[1]
        return share if world == 1 else world * share + (total - world * share).detach()

    @torch.no_grad()
    def image_mismatch(self, batch, n_particles: int | None = None) -> float:
        """The mean image mismatch D of a batch with a beam of `n_particles` (more particles than in
        training: D without most of the model's shot noise). In a distributed fit every process must
        call it (they share the work)."""
        return self._sum_over_processes(self._loss(batch, self.beam(n_particles), share=True)).item()

    def on_train_batch_start(self, batch, batch_idx) -> None:
        if isinstance(self.lattice.space_charge, LaggedSpaceCharge):
            self.lattice.space_charge.start_step()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if isinstance(self.lattice.space_charge, LaggedSpaceCharge):
            self.lattice.space_charge.end_step()

    def training_step(self, batch, batch_idx):  # noqa: D102
        if not self.max_entropy:
            share = self._loss(batch, share=True)
            loss = self._sum_over_processes(share)
            self.log("train_loss", loss, prog_bar=True)
            return self._with_calibration_prior(self._distributed(share, loss))
        particles, entropy = self.relative_entropy()  # the same beam in every process
        share = self._loss(batch, sim.ParticleBeam(particles, self.p0c, self.species, self.charge), share=True)
        mismatch = self._sum_over_processes(share)
        penalty = self.penalty.to(mismatch.dtype)
        objective = -entropy + penalty * self._distributed(share, mismatch)
        self.log("train_loss", mismatch, prog_bar=True)
        self.log_dict({"train_objective": objective.detach(), "entropy": entropy.detach(), "penalty": self.penalty.float()})
        return self._with_calibration_prior(objective)

    def _with_calibration_prior(self, objective: torch.Tensor) -> torch.Tensor:
        """The objective plus the calibration's Gaussian priors (every process adds them: DDP averages); logs
        the calibrated values (metrics.csv columns `calibration/<name>[<i>]`)."""
        if len(self.calibration):
            self.log_dict(self.calibration.scalars())
        prior = self.calibration.prior_penalty()
        if prior is None:
            return objective
        self.log("calibration_prior", prior.detach())
        return objective + prior.to(objective.dtype)

    def validation_step(self, batch, batch_idx):
        share = self._loss(batch, share=True)  # one validation batch (the held-out settings) per epoch
        self.log("val_loss", share, prog_bar=True, sync_dist=True, reduce_fx="sum")
        return share

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        steps = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup, final = self.hparams.warmup_steps, self.hparams.lr_final_fraction

        def factor(step: int) -> float:
            cosine = final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
            return min(1.0, (step + 1) / warmup) * cosine if warmup else cosine

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
