"""`model.init_from`: start a fit's generator from the weights of an earlier fit (a warm start)."""

from pathlib import Path

import torch
from torch import nn


def load_generator_weights(generator: nn.Module, path: str) -> tuple[Path, list[str]]:
    """Copy the generator weights of a Lightning checkpoint (a .ckpt file, or a run folder: its
    checkpoints/last.ckpt) into `generator`; the checkpoint's optimizer, step and schedule are not taken, so
    the fit runs its own schedule from them. Buffers with one row per particle (base samples) of another
    particle count stay the generator's own: the warm start may use more or fewer particles. Weights the
    checkpoint lacks (an option such as tail_skip that the earlier fit had off; they start at zero, so the
    generator is still the earlier fit's function) stay as initialized. Returns the checkpoint's path and
    those weights' names. ValueError naming the problem when the file is missing, is not a checkpoint, or
    holds a generator of another shape."""
    source = Path(path)
    if source.is_dir():
        source = source / "checkpoints" / "last.ckpt"
    if not source.is_file():
        raise ValueError(f"model.init_from: no checkpoint {source} (give a .ckpt file or a run folder with "
                         "checkpoints/last.ckpt)")
    try:
        checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    except Exception as err:  # any unreadable file: pickle, zip or torch errors
        raise ValueError(f"model.init_from: {source} is not a checkpoint ({type(err).__name__}: {err})") from None
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    weights = {k[len("generator."):]: v for k, v in (state or {}).items() if k.startswith("generator.")}
    if not weights:
        raise ValueError(f"model.init_from: {source} holds no generator weights (not a `psr fit` checkpoint)")
    own = generator.state_dict()
    trained = {name for name, _ in generator.named_parameters()}
    missing = [key for key in own if key not in weights]
    if len(missing) == len(own):
        raise ValueError(f"model.init_from: {source} shares no weight with model.generator ({type(generator).__name__}): "
                         "another generator")
    for key, value in own.items():
        if key not in weights:  # an option the earlier fit had off (e.g. tail_skip): kept as initialized
            weights[key] = value
            continue
        if key not in trained and weights[key].shape[1:] == value.shape[1:] and weights[key].ndim == value.ndim:
            if weights[key].shape != value.shape:  # per-particle buffers (base samples) of another particle count:
                weights[key] = value  # the fit keeps its own draw of the same distribution
        if weights[key].shape != value.shape:
            raise ValueError(f"model.init_from: {source}'s generator weight {key!r} has shape "
                             f"{tuple(weights[key].shape)}, model.generator's {tuple(value.shape)}: another width, "
                             "depth or dimension")
    extra = sorted(set(weights) - set(own))
    if extra:
        raise ValueError(f"model.init_from: {source} has generator weights model.generator lacks ({extra[0]!r}, ...): "
                         "another generator")
    generator.load_state_dict(weights)
    return source, missing
