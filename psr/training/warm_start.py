"""`model.init_from`: start a fit's generator from the weights of an earlier fit (a warm start)."""

from pathlib import Path

import torch
from torch import nn

from psr.training.run_folder import find_checkpoint


def load_generator_weights(generator: nn.Module, path: str) -> tuple[Path, list[str]]:
    """Copy the generator weights of a Lightning checkpoint (a .ckpt file, or a run folder: its checkpoint)
    into `generator`; the checkpoint's optimizer, step and schedule are not taken, so the fit runs its own
    schedule from them. Buffers with one row per particle (base samples) of another particle count stay the
    generator's own: the warm start may use more or fewer particles. Weights the checkpoint lacks (an option
    such as tail_skip that the earlier fit had off; they start at zero, so the generator is still the earlier
    fit's function) stay as initialized. Returns the checkpoint's path and those weights' names. ValueError
    naming the problem when the file is missing, is not a checkpoint, or holds a generator of another shape."""
    source = Path(path)
    try:
        source = find_checkpoint(source) if source.is_dir() else source
    except ValueError as err:
        raise ValueError(f"model.init_from: {err}") from None
    if not source.is_file():
        raise ValueError(f"model.init_from: no checkpoint {source} (give a .ckpt file or a run folder)")
    try:
        checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    except Exception as err:  # any unreadable file: pickle, zip or torch errors
        raise ValueError(f"model.init_from: {source} is not a checkpoint ({type(err).__name__}: {err})") from None
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    weights = {k[len("generator."):]: v for k, v in (state or {}).items() if k.startswith("generator.")}
    if not weights:
        raise ValueError(f"model.init_from: {source} holds no generator weights (not a `psr fit` checkpoint)")
    own = generator.state_dict()
    extra = sorted(set(weights) - set(own))
    missing = [key for key in own if key not in weights]
    if extra or len(missing) == len(own):
        raise ValueError(f"model.init_from: {source} holds a generator of another kind than model.generator "
                         f"({type(generator).__name__}" + (f"; it has {extra[0]!r})" if extra else ")"))
    trained = {name for name, _ in generator.named_parameters()}
    for key, value in own.items():
        theirs = weights.setdefault(key, value)  # missing: kept as initialized
        if theirs.shape == value.shape:
            continue
        if key in trained or theirs.ndim != value.ndim or theirs.shape[1:] != value.shape[1:]:
            raise ValueError(f"model.init_from: {source}'s generator weight {key!r} has shape {tuple(theirs.shape)}, "
                             f"model.generator's {tuple(value.shape)}: another width, depth or dimension")
        weights[key] = value  # a per-particle buffer of another particle count: the fit keeps its own draw
    generator.load_state_dict(weights)
    return source, missing
