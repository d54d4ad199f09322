"""End-of-training outputs of `psr surrogate`: the weights file, held-out moment errors, plots."""

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from psr.data.atomic import atomic_target
from psr.outputs.plots import plot_loss, plt, save_figure
from psr.training.surrogate import used_coordinates

RMS_NAMES = ("x", "px", "y", "py", "z", "pz")


@torch.no_grad()
def write_surrogate_report(model, datamodule, run_dir) -> dict:
    """Export the element's weights (model.weights and <run_dir>/<file name>), surrogate.json (held-out rms
    and emittance errors) and moments.png (predicted vs reference moments of the held-out beams)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    errors = model.moment_errors({k: v.to(model.device) for k, v in datamodule.held_out().items()})
    rms_err = errors["rms"].cpu().numpy()
    emit_err = errors["emittance"].cpu().numpy()
    used = [i for i, u in enumerate(used_coordinates(datamodule.beams_in[:1]).tolist()) if u]  # 4D beams: no z, pz
    summary = {
        "held_out_beams": int(rms_err.shape[0]),
        "rms_relative_error_max": {RMS_NAMES[i]: float(np.abs(rms_err[:, i]).max()) for i in used},
        "rms_relative_error_mean": {RMS_NAMES[i]: float(rms_err[:, i].mean()) for i in used},
        "emittance_relative_error_max": {n: float(np.abs(emit_err[:, i]).max()) for i, n in enumerate(("x", "y"))},
        "emittance_relative_error_mean": {n: float(emit_err[:, i].mean()) for i, n in enumerate(("x", "y"))},
    }
    weights = Path(model.hparams.weights)
    model.element.save_weights(run_dir / weights.name)
    weights.parent.mkdir(parents=True, exist_ok=True)
    with atomic_target(weights) as tmp:
        shutil.copyfile(run_dir / weights.name, tmp)
    summary["weights"] = str(weights)
    with atomic_target(run_dir / "surrogate.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    _plot_moments(run_dir / "moments.png", errors)
    plot_loss(run_dir / "loss.png", run_dir / "metrics.csv", ylabel="surrogate loss")
    return summary


def _plot_moments(path: Path, errors: dict) -> None:
    from psr.training.surrogate import emittances, rms

    predicted, reference = errors["predicted"], errors["reference"]
    pairs = [("rms x [mm]", rms(predicted)[:, 0] * 1e3, rms(reference)[:, 0] * 1e3),
             ("rms y [mm]", rms(predicted)[:, 2] * 1e3, rms(reference)[:, 2] * 1e3),
             ("emittance x [nm]", emittances(predicted)[:, 0] * 1e9, emittances(reference)[:, 0] * 1e9),
             ("emittance y [nm]", emittances(predicted)[:, 1] * 1e9, emittances(reference)[:, 1] * 1e9)]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.6))
    for ax, (label, pred, ref) in zip(axes, pairs):
        pred, ref = pred.cpu().numpy(), ref.cpu().numpy()
        ax.plot(ref, pred, "o", ms=4)
        low, high = min(ref.min(), pred.min()), max(ref.max(), pred.max())
        ax.plot([low, high], [low, high], "k--", lw=0.8)
        ax.set_xlabel(f"reference {label}")
        ax.set_ylabel(f"surrogate {label}")
    fig.suptitle("held-out beams: surrogate vs reference physics")
    fig.tight_layout()
    save_figure(fig, path)


def format_surrogate(summary: dict) -> str:
    rms_max = ", ".join(f"{k} {100 * v:.2f} %" for k, v in summary["rms_relative_error_max"].items())
    emit = ", ".join(f"{k} {100 * v:.2f} %" for k, v in summary["emittance_relative_error_max"].items())
    return (f"held-out beams: {summary['held_out_beams']}; largest |relative error| of rms sizes: {rms_max}; "
            f"of emittances: {emit}\nweights: {summary['weights']}")
