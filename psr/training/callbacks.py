"""Lightning callbacks that drive training schedules."""

import warnings

from lightning.pytorch.callbacks import Callback


class PenaltySchedule(Callback):
    """The penalty method of MENT-Flow (Hoover & Wong, Phys. Rev. Research 6, 033163 (2024)) for
    `PhaseSpaceReconstruction(entropy_penalty=mu0)`: train `steps_per_stage` optimizer steps at a fixed
    penalty mu; at the end of each stage, if the mean image mismatch D (of a fresh beam of
    `eval_particles`, or, with eval_particles None, the training mismatch averaged over the stage's last
    `window` steps) is above `threshold`, multiply mu by `factor` (at most `max_penalty`) and train another stage. Once D is
    under the threshold the data are reproduced: training stops (`stop_when_met`) or goes on at that mu.

    threshold: mean image mismatch per image, in the units of `model.loss` (l1: 0 = perfect, 2 =
    disjoint). Set it just above the mismatch a plain fit reaches (the noise floor): with the
    default eval_particles that floor is the measured images' own noise; the training mismatch of N
    particles carries their shot noise as well (l1 ~ sqrt(pixels in the beam / N)).
    """

    def __init__(self, threshold: float, steps_per_stage: int = 200, factor: float = 2.0,
                 max_penalty: float = 1e6, window: int = 20, stop_when_met: bool = True,
                 eval_particles: int | None = 100_000):
        if not threshold > 0:
            raise ValueError(f"PenaltySchedule threshold must be positive, got {threshold}")
        if steps_per_stage < 1 or window < 1:
            raise ValueError(f"steps_per_stage and window must be >= 1, got {steps_per_stage}, {window}")
        if not factor > 1:
            raise ValueError(f"PenaltySchedule factor must be > 1, got {factor}")
        if eval_particles is not None and eval_particles < 2:
            raise ValueError(f"PenaltySchedule eval_particles must be >= 2 (or null), got {eval_particles}")
        self.eval_particles = eval_particles
        self.threshold, self.steps_per_stage, self.factor = threshold, steps_per_stage, factor
        self.max_penalty, self.window, self.stop_when_met = max_penalty, min(window, steps_per_stage), stop_when_met
        self.recent: list[float] = []
        self.stages: list[dict] = []  # one record per finished stage: step, penalty, mismatch
        self.met = False

    def on_fit_start(self, trainer, pl_module):
        if not getattr(pl_module, "max_entropy", False):
            raise ValueError("the PenaltySchedule callback needs model.entropy_penalty (a maximum-entropy fit)")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        mismatch = trainer.callback_metrics.get("train_loss")
        if mismatch is not None:
            self.recent = (self.recent + [float(mismatch)])[-self.window:]
        if trainer.global_step % self.steps_per_stage or not self.recent:
            return
        mean = sum(self.recent) / len(self.recent)
        if self.eval_particles is not None:
            mean = pl_module.image_mismatch(batch, self.eval_particles)
        pl_module.log("stage_mismatch", mean)
        penalty = float(pl_module.penalty)
        self.stages.append({"step": trainer.global_step, "penalty": penalty, "mismatch": mean})
        if mean <= self.threshold:
            self.met = True
            if self.stop_when_met:
                trainer.should_stop = True
            return
        if penalty >= self.max_penalty:
            warnings.warn(f"PenaltySchedule: the penalty reached max_penalty={self.max_penalty:g} with the image "
                          f"mismatch {mean:.4g} still above threshold={self.threshold:g}", stacklevel=2)
            return
        pl_module.penalty.fill_(min(penalty * self.factor, self.max_penalty))
        self.recent = []

    def state_dict(self):
        return {"recent": self.recent, "stages": self.stages, "met": self.met}

    def load_state_dict(self, state_dict):
        self.recent, self.stages, self.met = state_dict["recent"], state_dict["stages"], state_dict["met"]
