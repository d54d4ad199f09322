"""Crash-safe training: atomic checkpoints, random states that resume exactly, and a divergence guard."""

import os
import random

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from psr.data.atomic import atomic_target

CHECKPOINT_EVERY_N_STEPS = 100  # default of `psr fit --checkpoint.every_n_train_steps`


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temporary sibling, fsync, rename over the target: a kill at any moment
    leaves either the previous checkpoint or the new one, never a truncated file."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with atomic_target(path) as tmp:  # fsynced before the rename
            torch.save(checkpoint, tmp)


class Checkpoints(ModelCheckpoint):
    """Lightning's ModelCheckpoint (`psr fit --checkpoint.*`) that, saving every `every_n_train_steps`
    steps, also saves at the end of every epoch (ModelCheckpoint takes one trigger or the other).
    A step that ends an epoch is saved at the epoch's end, not at its batch end: Lightning 2.6,
    resumed from a checkpoint of the last batch taken before the epoch ended, counts that epoch as
    not started, and a later resume of the same run trains one epoch too many."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx + 1 < trainer.num_training_batches:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer, pl_module):
        super().on_train_epoch_end(trainer, pl_module)
        if (self._every_n_train_steps and not self._should_skip_saving_checkpoint(trainer)
                and self._last_global_step_saved != trainer.global_step):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)


def _owned_generators(module: torch.nn.Module) -> dict[str, torch.Generator]:
    """{"<module path>.<attribute>": generator} of every torch.Generator a submodule holds."""
    return {f"{name}.{attr}": value for name, sub in module.named_modules()
            for attr, value in vars(sub).items() if isinstance(value, torch.Generator)}


class RandomState(Callback):
    """Makes a resumed fit draw the same random numbers as an uninterrupted one.

    The random state (torch CPU and CUDA, numpy, python, and every torch.Generator the model's modules
    hold) is captured after each optimizer step and put back before the next one, so nothing that
    draws between steps (data loader iterators, validation, checkpoint checks) changes the training
    stream. The captured state goes into every checkpoint and is put back before the first step
    after a resume.
    """

    def __init__(self):
        self.state: dict | None = None

    def _capture(self, pl_module) -> dict:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()  # as tensors and numbers (weights_only loading)
        state = {"torch": torch.get_rng_state(), "python": random.getstate(),
                 "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
                 "generators": {k: (str(g.device), g.get_state()) for k, g in _owned_generators(pl_module).items()}}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def _restore(self, pl_module, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        modules = dict(pl_module.named_modules())
        for key, (device, generator_state) in state.get("generators", {}).items():
            name, _, attr = key.rpartition(".")
            if name in modules:
                generator = getattr(modules[name], attr, None)
                if not isinstance(generator, torch.Generator):
                    generator = torch.Generator(device)
                    setattr(modules[name], attr, generator)
                generator.set_state(generator_state)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.state is not None:
            self._restore(pl_module, self.state)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.state = self._capture(pl_module)

    def state_dict(self):
        return {"state": self.state}

    def load_state_dict(self, state_dict):
        self.state = state_dict["state"]


class FitDiverged(RuntimeError):
    """A fit stopped by `DivergenceGuard`: step (the optimizer step that showed it), what happened, likely cause."""

    def __init__(self, step: int, what: str, cause: str):
        super().__init__(f"step {step}: {what}; likely cause: {cause}")
        self.step, self.what, self.cause = step, what, cause


def _evaluate(pl_module, function):
    """function() in eval mode without gradients, leaving the random state and the mode as they were."""
    was_training = pl_module.training
    pl_module.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            return function()
    finally:
        pl_module.train(was_training)


def _weights_finite(module: torch.nn.Module) -> bool:
    flags = [p.detach().isfinite().all() for p in module.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


class DivergenceGuard(Callback):
    """Stops a fit (raises `FitDiverged`) as soon as the loss is NaN or infinite, a weight is not
    finite, or the beam has left every screen (no particle on any image: the image mismatch equals
    its value for empty predicted images, confirmed by tracking). The same checks run on the weights
    before every checkpoint is written, so a checkpoint on disk never holds a diverged state.
    Cost per step: one finiteness pass over the weights and a comparison of two numbers.
    """

    def __init__(self):
        self._batch = None
        self._empty_loss: tuple | None = None  # (key of the batch's images, mismatch of empty predictions)
        self._checked_step = -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._batch = batch

    def _mismatch_of_nothing(self, pl_module, batch) -> float:
        """The image mismatch when every predicted image is empty (the beam on no screen)."""
        key = tuple(img.data_ptr() for img in batch["images"].values())
        if self._empty_loss is None or self._empty_loss[0] != key:
            losses = []
            for name, images in batch["images"].items():
                measured = images[batch["measured"][name]]
                losses.append(float(pl_module.screen_mismatch(name, torch.zeros_like(measured), measured)))
            self._empty_loss = (key, sum(losses) / len(losses))
        return self._empty_loss[1]

    def _beam_on_no_screen(self, pl_module, batch) -> bool:
        """True when the current beam (fixed base samples, eval mode) puts no particle on any image."""
        images = _evaluate(pl_module, lambda: pl_module.predict_images(batch["settings"], measured=batch["measured"]))
        return all(float(img.abs().sum()) == 0.0 for img in images.values())

    def _cause(self, trainer, pl_module, off_screen: bool) -> str:
        lr = pl_module.hparams.get("lr")
        rate = f"model.lr={lr:g}" if lr is not None else "model.lr"
        if trainer.optimizers:
            rate += f", {trainer.optimizers[0].param_groups[0]['lr']:.3g} at this step"
        if off_screen and trainer.global_step <= 1:
            return ("the initial beam does not reach the screens (compare model.generator.init_args.scale "
                    "with the screens' size)")
        if off_screen:
            return f"the learning rate is too large and threw the beam off the screens ({rate})"
        return f"the learning rate is too large ({rate})"

    def _check(self, trainer, pl_module, batch, mismatch) -> None:
        step = trainer.global_step
        if mismatch is not None and not torch.isfinite(torch.as_tensor(mismatch)).all():
            raise FitDiverged(step, f"the loss is {float(mismatch)}", self._cause(trainer, pl_module, False))
        if not _weights_finite(pl_module):
            raise FitDiverged(step, "the network weights became non-finite (NaN or inf)",
                              self._cause(trainer, pl_module, False))
        if batch is None or mismatch is None:
            return
        empty = self._mismatch_of_nothing(pl_module, batch)
        if abs(float(mismatch) - empty) <= 1e-6 * max(abs(empty), 1e-30) and self._beam_on_no_screen(pl_module, batch):
            raise FitDiverged(step, "the beam has left every screen (no particle on any image; "
                                    f"loss {float(mismatch):.6g})",
                              self._cause(trainer, pl_module, True))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(loss.detach()).all():
            self._check(trainer, pl_module, None, loss.detach())
        mismatch = trainer.callback_metrics.get("train_loss", loss)
        self._check(trainer, pl_module, batch, None if mismatch is None else mismatch.detach())

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        """Check the weights about to be saved: finite, a finite loss, a beam on some screen."""
        if self._batch is None or self._checked_step == trainer.global_step or trainer.state.fn != "fit":
            return
        mismatch = _evaluate(pl_module, lambda: pl_module._loss(self._batch))
        self._check(trainer, pl_module, self._batch, mismatch)
        self._checked_step = trainer.global_step
