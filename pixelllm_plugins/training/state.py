"""Everything an exact resume needs besides the model weights, stored without pickle.

``training_state.safetensors`` holds every tensor (optimizer moments, RNG states, numpy arrays);
``training_state.json`` holds the rest with ``{"__tensor__": key}`` placeholders, so nested Python
structures (optimizer ``state_dict``, data-stream state, RNG tuples) round-trip exactly.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import TrainingError

STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"
STATE_VERSION = 1


# ---- a JSON + tensors codec --------------------------------------------------------------------------

def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = path or "root"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = path or "root"
        tensors[key] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind in "ui" else obj.copy())
        return {"__ndarray__": key, "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(k.startswith("__") for k in obj):
            return {k: _encode(v, f"{path}.{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, f"{path}.k{i}", tensors), _encode(v, f"{path}.{i}", tensors)]
                              for i, (k, v) in enumerate(obj.items())]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TrainingError(f"cannot store {type(obj).__name__} at {path or 'root'} in the training state; "
                        "state_dict() values must be tensors, arrays, numbers, strings, lists or dicts")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy().astype(obj["dtype"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def save_tree(directory: str | Path, tree: dict, *, tensors_name: str = STATE_TENSORS,
              json_name: str = STATE_JSON) -> None:
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(tree, "", tensors)
    directory = Path(directory)
    save_file(tensors, str(directory / tensors_name))
    (directory / json_name).write_text(json.dumps(encoded, indent=1) + "\n")


def load_tree(directory: str | Path, *, tensors_name: str = STATE_TENSORS, json_name: str = STATE_JSON) -> dict:
    directory = Path(directory)
    try:
        encoded = json.loads((directory / json_name).read_text())
        tensors = load_file(str(directory / tensors_name))
    except (OSError, json.JSONDecodeError, ValueError) as exc:
        raise TrainingError(f"cannot read the training state in {directory}: {exc}; delete that folder to "
                            "start over, or point --out at a fresh directory") from exc
    return _decode(encoded, tensors)


# ---- RNG -------------------------------------------------------------------------------------------

def capture_rng() -> dict:
    """The global RNG states of this process (torch CPU and CUDA, numpy, Python ``random``)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device only
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---- the training state ------------------------------------------------------------------------------

@dataclass
class TrainingState:
    step: int  # optimizer steps completed
    optimizer: dict  # torch optimizer state_dict (no LR scheduler object: the LR is a function of step)
    data: list[Any]  # data-stream state per rank
    rng: list[dict]  # capture_rng() per rank
    param_names: list[str]  # trainable parameters, in optimizer order (checked on resume)
    meta: dict = field(default_factory=dict)  # recipe, config, world size, ...

    def save(self, directory: str | Path) -> None:
        save_tree(directory, {"version": STATE_VERSION, "step": self.step, "optimizer": self.optimizer,
                              "data": self.data, "rng": self.rng, "param_names": self.param_names,
                              "meta": self.meta})

    @classmethod
    def load(cls, directory: str | Path) -> TrainingState:
        tree = load_tree(directory)
        if tree.get("version") != STATE_VERSION:
            raise TrainingError(f"training state in {directory} has version {tree.get('version')}, this "
                                f"pixelllm-plugins writes {STATE_VERSION}; start a fresh run")
        return cls(step=int(tree["step"]), optimizer=tree["optimizer"], data=tree["data"], rng=tree["rng"],
                   param_names=list(tree["param_names"]), meta=tree.get("meta", {}))

    @staticmethod
    def exists(directory: str | Path) -> bool:
        d = Path(directory)
        return (d / STATE_JSON).is_file() and (d / STATE_TENSORS).is_file()
