"""Trainer checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint folder holds the model as a ``save_pretrained`` folder plus ``optimizer.safetensors``
+ ``optimizer.json`` (AdamW moments and param groups), ``scheduler.json``, ``rng-<rank>.safetensors``
+ ``rng-<rank>.json`` (torch, CUDA, numpy and Python generators of every rank) and
``trainer_state.json``, written last. Folders are staged under a temporary name and swapped in, so
a kill at any moment leaves the previous checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..store import atomic_write_json

STATE_FILE = "trainer_state.json"
RESUME_FILES = ("optimizer.safetensors", "optimizer.json", "scheduler.json", "rng-0.safetensors", "rng-0.json")
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- optimizer


def optimizer_state_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (``state.<param>.<name>``) and JSON."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in sd["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_state_dict(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_optimizer(folder: Path, optimizer: torch.optim.Optimizer) -> None:
    tensors, meta = optimizer_state_files(optimizer)
    save_file(tensors, str(folder / "optimizer.safetensors"))
    atomic_write_json(folder / "optimizer.json", meta)


def load_optimizer(folder: Path, optimizer: torch.optim.Optimizer) -> None:
    tensors = load_file(str(folder / "optimizer.safetensors"))
    meta = json.loads((folder / "optimizer.json").read_text(encoding="utf-8"))
    optimizer.load_state_dict(optimizer_state_dict(tensors, meta))


def save_scheduler(folder: Path, scheduler: Any) -> None:
    sd = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    atomic_write_json(folder / "scheduler.json", sd)


def load_scheduler(folder: Path, scheduler: Any) -> None:
    sd = json.loads((folder / "scheduler.json").read_text(encoding="utf-8"))
    sd["lr_lambdas"] = [None] * len(scheduler.lr_lambdas)
    scheduler.load_state_dict(sd)


# ----------------------------------------------------------------------------- random generators


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    np_state: Any = np.random.get_state()
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state: list[Any] = meta["numpy"]
    name, keys, pos, has_gauss, cached = numpy_state
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a stretch (a validation) without moving any generator the training draws from."""
    tensors, meta = rng_state()
    try:
        yield
    finally:
        set_rng_state(tensors, meta)


def save_rng(folder: Path, rank: int) -> None:
    tensors, meta = rng_state()
    save_file(tensors, str(folder / f"rng-{rank}.safetensors"))
    atomic_write_json(folder / f"rng-{rank}.json", meta)


def load_rng(folder: Path, rank: int) -> bool:
    """Restore this rank's generators; False when the checkpoint has none for it (more ranks now)."""
    if not (folder / f"rng-{rank}.safetensors").exists():
        return False
    tensors = load_file(str(folder / f"rng-{rank}.safetensors"))
    meta = json.loads((folder / f"rng-{rank}.json").read_text(encoding="utf-8"))
    set_rng_state(tensors, meta)
    return True


# ----------------------------------------------------------------------------- model weights


def model_weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [folder / n for n in names]
    return [folder / "model.safetensors"]


def load_model_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load a ``save_pretrained`` folder's weights into an existing model (exactly, tied weights included)."""
    state: dict[str, torch.Tensor] = {}
    for f in model_weight_files(folder):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    loaded_ptrs = {p.data_ptr() for n, p in model.state_dict(keep_vars=True).items() if n in state}
    own = model.state_dict(keep_vars=True)
    really_missing = [k for k in missing if own[k].data_ptr() not in loaded_ptrs]
    if really_missing or unexpected:
        raise ValueError(f"checkpoint {folder} does not match the model: missing {really_missing[:5]}, unexpected {list(unexpected)[:5]}")


# ----------------------------------------------------------------------------- folders


def read_state(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def staging_dir(final: Path) -> Path:
    return final.with_name(f".{final.name}.partial")


def publish(staged: Path, final: Path) -> None:
    """Swap a complete staged folder in for ``final`` (the old one kept until the swap is done)."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    staged.rename(final)
    if old.exists():
        shutil.rmtree(old)


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be resumed from (a file missing, truncated or garbled), or None."""
    if read_state(folder) is None:
        return f"{STATE_FILE} is missing or unreadable"
    missing = [n for n in RESUME_FILES if not (folder / n).is_file()]
    if missing:
        return f"{missing[0]} is missing"
    for f in sorted(folder.glob("*.json")):
        try:
            json.loads(f.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return f"{f.name} is not valid JSON"
    try:
        weights = model_weight_files(folder)
    except (KeyError, TypeError, AttributeError):
        return "model.safetensors.index.json has no weight_map"
    for f in [*weights, *sorted(folder.glob("*.safetensors"))]:
        if not f.is_file():
            return f"{f.name} is missing"
        try:
            with safe_open(str(f), framework="pt"):  # reads the header; checks the file covers it
                pass
        except (OSError, SafetensorError) as exc:
            return f"{f.name}: {exc}"
    return None


def complete_checkpoint(final: Path) -> Path | None:
    """The newest complete checkpoint folder: ``final``, or the one a kill mid-swap left behind.
    A folder with a missing, truncated or garbled file is never returned (and is reported)."""
    for candidate in (final, final.with_name(f".{final.name}.old")):
        if not candidate.is_dir():
            continue
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate
        if read_state(candidate) is not None:
            log.warning("checkpoint %s is damaged (%s): not resumed from", candidate, problem)
    return None


def clear_dir(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)
