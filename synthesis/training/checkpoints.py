"""Training checkpoints: written atomically, resumed exactly, the best k kept.

A checkpoint is one folder ``<work>/checkpoints/step-<N>/`` holding the trainable weights
(``trainable.safetensors``, float32), the optimiser, learning-rate schedule and EMA
states (``optimizer.pt``, ``lr_scheduler.pt``, ``ema.pt``) and ``state.json`` (step,
configuration fingerprint, validation loss, loss history). It is written under a
temporary name and renamed into place, so a run killed at any moment leaves only whole
checkpoints; temporary leftovers are removed on the next start.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from histosynth.common.files import replace_durably
from histosynth.synthesis.errors import EngineError

__all__ = [
    "Checkpoint",
    "find_checkpoints",
    "latest_checkpoint",
    "prune_checkpoints",
    "write_checkpoint",
]

STATE_FILE = "state.json"
WEIGHTS_FILE = "trainable.safetensors"
_NAME = re.compile(r"step-(\d+)")


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint folder and its ``state.json``."""

    folder: Path
    step: int
    state: dict[str, Any]

    @property
    def val_loss(self) -> float | None:
        """Validation loss at this step (``None`` when there was no validation)."""
        value = self.state.get("val_loss")
        return None if value is None else float(value)

    def weights(self) -> dict[str, torch.Tensor]:
        """The trainable tensors by parameter name."""
        return load_file(str(self.folder / WEIGHTS_FILE))

    def torch_state(self, name: str) -> Any:
        """``optimizer``, ``lr_scheduler`` or ``ema`` state (``None`` when not saved)."""
        path = self.folder / f"{name}.pt"
        if not path.is_file():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)


def write_checkpoint(
    root: Path,
    step: int,
    *,
    weights: dict[str, torch.Tensor],
    states: dict[str, Any],
    state: dict[str, Any],
) -> Checkpoint:
    """Write checkpoint ``step`` into ``root`` atomically (temporary folder + rename)."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in weights.items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        for name, value in states.items():
            if value is not None:
                torch.save(value, tmp / f"{name}.pt")
        record = {"step": step, **state}
        (tmp / STATE_FILE).write_text(json.dumps(record, indent=1) + "\n", "utf-8")
        for path in tmp.iterdir():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():
            shutil.rmtree(final)
        replace_durably(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return Checkpoint(final, step, record)


def find_checkpoints(root: Path) -> list[Checkpoint]:
    """Complete checkpoints in ``root``, by step; temporary leftovers are removed."""
    if not root.is_dir():
        return []
    out = []
    for folder in root.iterdir():
        if folder.name.startswith(".tmp-"):
            shutil.rmtree(folder, ignore_errors=True)
            continue
        match = _NAME.fullmatch(folder.name)
        if not match or not (folder / STATE_FILE).is_file():
            continue
        try:
            state = json.loads((folder / STATE_FILE).read_text("utf-8"))
        except (OSError, ValueError) as err:
            raise EngineError(f"cannot read the checkpoint ({err})", path=folder) from err
        if not (folder / WEIGHTS_FILE).is_file():
            raise EngineError(f"checkpoint without {WEIGHTS_FILE}", path=folder)
        out.append(Checkpoint(folder, int(match.group(1)), state))
    return sorted(out, key=lambda c: c.step)


def latest_checkpoint(root: Path) -> Checkpoint | None:
    """The checkpoint with the highest step, or ``None``."""
    found = find_checkpoints(root)
    return found[-1] if found else None


def prune_checkpoints(root: Path, keep_best: int) -> list[Checkpoint]:
    """Delete all but the last checkpoint and the ``keep_best`` lowest validation losses.

    Returns the checkpoints kept. Checkpoints without a validation loss count as worst.
    """
    found = find_checkpoints(root)
    if not found:
        return []
    ranked = sorted(found[:-1], key=lambda c: (c.val_loss is None, c.val_loss or 0.0, -c.step))
    keep = {found[-1].folder, *(c.folder for c in ranked[:keep_best])}
    for checkpoint in found:
        if checkpoint.folder not in keep:
            shutil.rmtree(checkpoint.folder, ignore_errors=True)
    return [c for c in found if c.folder in keep]
