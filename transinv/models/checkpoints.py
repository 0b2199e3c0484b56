"""Files every source shares: what ``--weights`` names, safe state-dict loading, and the
"did you mean" for a mistyped path."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError, did_you_mean

if TYPE_CHECKING:
    from torch import nn

AS_BUILT = "as-built"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")


def no_such_file(what: str, path: Path, suffixes: tuple[str, ...]) -> UserError:
    """``<what> <path> not found``, suggesting files beside it with one of ``suffixes``."""
    folder = path.parent if path.parent.is_dir() else None
    near = [str(p) for p in folder.iterdir() if p.suffix.lower() in suffixes] if folder else []
    return UserError(f"{what} {path} not found{did_you_mean(str(path), near)}")


def checkpoint_path(weights: str) -> Path | None:
    """The checkpoint file ``--weights`` names, or None when it names pretrained weights or none."""
    if weights.lower() in ("none", "default"):
        return None
    path = Path(weights).expanduser()
    if path.is_file():
        return path
    if "/" in weights or path.suffix:
        raise no_such_file("--weights: checkpoint file", path, CHECKPOINT_SUFFIXES)
    return None


def built_weights(spec: str, weights: str) -> Path | None:
    """For a model its factory builds: the checkpoint to load into it, or None to keep it as built.

    Checked before the factory runs, so a bad ``--weights`` costs no user code.
    """
    path = checkpoint_path(weights)
    if path is None and weights.lower() not in ("none", "default"):
        raise UserError(f"--weights {weights}: {spec} is built by its factory: use DEFAULT (as built), none or a checkpoint path")
    return path


def _first(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")


def load_checkpoint(module: nn.Module, path: Path) -> None:
    """Load a state dict (bare, or under ``state_dict``/``model``) safely, with a one-line mismatch report."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a bad or unsafe file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load checkpoint {path} (weights_only=True): {first}") from exc
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"checkpoint {path} holds no state dict (expected tensors, or a dict with 'state_dict'/'model')")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected {_first(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch {'; '.join(shapes[:3])}" + (f" (+{len(shapes) - 3} more)" if len(shapes) > 3 else ""))
    if problems:
        raise UserError(f"checkpoint {path} does not fit the model: {'; '.join(problems)}")
    module.load_state_dict(state)
