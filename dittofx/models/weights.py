"""Load weights into a model: a safetensors file or a torch state dict, strictly, with one-line errors."""

from __future__ import annotations

import os

import torch
from torch import nn

from dittofx.errors import ModelSpecError, first_line

WEIGHT_FORMS = "accepted: a .safetensors file, or a torch.save'd state dict (optionally under 'state_dict' or 'model')"


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = first_line(exc, limit)
    return text if text == type(exc).__name__ else f"{type(exc).__name__}: {text}"


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a safetensors file or a torch state dict file into `model`, strictly; returns `model`.

    A torch file may hold the state dict itself or a dict with it under "state_dict" or "model".
    A `module.` (DataParallel) or `_orig_mod.` (torch.compile) prefix common to all keys is
    dropped. Keys the model ties to another present key (shared weights) may be absent.
    Any missing, unexpected or differently shaped key is a ModelSpecError naming up to 5 of each.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelSpecError(f"weights file {path!r} does not exist ({WEIGHT_FORMS})")
    state = _read_state_dict(path)

    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}

    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing:  # tied weights: a key sharing storage with a key the file has is filled by it
        groups: dict[tuple, list[str]] = {}
        for k, t in own.items():
            groups.setdefault(_storage_key(t), []).append(k)
        missing = [k for k in missing if not any(o in state for o in groups[_storage_key(own[k])])]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_few(unexpected)})")
        if wrong:
            shown = ", ".join(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong[:5])
            parts.append(f"{len(wrong)} with another shape ({shown}{', ...' if len(wrong) > 5 else ''})")
        raise ModelSpecError(
            f"weights {path} do not match {type(model).__name__} ({len(own)} keys, file has {len(state)}): "
            + "; ".join(parts)
        )
    model.load_state_dict(state, strict=False)
    return model


def _storage_key(t: torch.Tensor) -> tuple:
    try:
        return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
    except Exception:  # noqa: BLE001 - tensors without storage (meta, some subclasses): never tied
        return (id(t),)


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    accepted = WEIGHT_FORMS
    with open(path, "rb") as f:
        head = f.read(9)
    if path.endswith(".safetensors") or (len(head) == 9 and head[8:9] == b"{"):
        try:
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        except Exception as e:
            raise ModelSpecError(f"cannot read {path} as safetensors: {_one_line(e)} ({accepted})") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelSpecError(
            f"cannot read {path} as a torch state dict (weights_only=True): {_one_line(e)} ({accepted})"
        ) from e
    for _ in range(2):
        if isinstance(obj, dict):
            inner = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), dict)), None)
            if inner is not None:
                obj = inner
    if not isinstance(obj, dict) or not obj:
        raise ModelSpecError(f"{path} holds {type(obj).__name__}, not a state dict ({accepted})")
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if bad:
        raise ModelSpecError(
            f"{path} is not a state dict: {len(bad)} entries are not named tensors "
            f"({_few([str(b) for b in bad])}; {accepted})"
        )
    return obj
