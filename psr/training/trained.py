"""A trained model back from its run folder (config.yaml + checkpoint), without the scan file it was fitted on."""

from pathlib import Path

import torch
import yaml

from psr.training.reconstruction import PhaseSpaceReconstruction
from psr.training.run_folder import find_checkpoint


def load_trained(run_dir) -> tuple[PhaseSpaceReconstruction, Path]:
    """(the model of a `psr fit` run folder in eval mode, its checkpoint): built from the run's config.yaml
    (model section), configured from the scan summary saved with the checkpoint, weights loaded."""
    from jsonargparse import ArgumentParser

    run = Path(run_dir)
    if not run.is_dir():
        raise ValueError(f"run folder {run}: " + ("is a file, not a run folder" if run.exists() else "no such folder"))
    config_path = run / "config.yaml"
    if not config_path.is_file():
        raise ValueError(f"run folder {run}: holds no config.yaml (not a psr fit run folder)")
    checkpoint_path = find_checkpoint(run)
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file
        raise ValueError(f"{checkpoint_path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    summary = checkpoint.get("psr_scan") if isinstance(checkpoint, dict) else None
    if not summary or "state_dict" not in checkpoint:
        raise ValueError(f"{checkpoint_path}: holds no trained psr model with its scan summary (a checkpoint of "
                         "`psr fit` from this version of psr is needed)")
    config = yaml.safe_load(config_path.read_text()) or {}
    if not isinstance(config.get("model"), dict):
        raise ValueError(f"{config_path}: has no model section")
    config["model"].pop("init_from", None)  # a warm start's source: the run's own checkpoint replaces it
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(PhaseSpaceReconstruction, "model")
    try:
        parsed = parser.parse_object({"model": config["model"]})
        model = parser.instantiate_classes(parsed).model
    except Exception as err:  # jsonargparse's errors of a hand-edited config
        raise ValueError(f"{config_path}: the model section cannot be built: {err}") from None
    model.configure_summary(summary)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), checkpoint_path
