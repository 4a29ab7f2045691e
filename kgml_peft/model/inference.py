"""Batched prediction over year windows, in physical units."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from kgml_peft.data.windows import Scalers, WindowDataset, YearWindows
from kgml_peft.model.outputs import physical
from kgml_peft.model.physics import perturbed_response

PREDICTED = ("Ra", "Rh", "NEE", "Reco", "Yield")


def in_batches(
    x: torch.Tensor, batch_size: int, run: Callable[[int, int], dict[str, torch.Tensor]],
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Call ``run(start, stop)`` over consecutive slices of ``x``; concatenate its outputs as
    float64 arrays (``progress`` shows a bar over the batches)."""
    chunks: dict[str, list[np.ndarray]] = {}
    starts = range(0, len(x), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="predict", unit="batch", leave=False)
    for start in starts:
        for name, value in run(start, min(start + batch_size, len(x))).items():
            chunks.setdefault(name, []).append(value.float().cpu().numpy().astype("float64"))
    return {name: np.concatenate(parts) for name, parts in chunks.items()}


@torch.no_grad()
def predict_windows(
    model: torch.nn.Module,
    scalers: Scalers,
    windows: YearWindows,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> dict[str, np.ndarray]:
    """Ra, Rh, NEE, Reco [N, 365] (gC m-2 d-1) and Yield [N] (t ha-1) for every window."""
    model.eval()
    x = WindowDataset(windows, scalers).x

    def run(start: int, stop: int) -> dict[str, torch.Tensor]:
        phys = physical(model(x[start:stop].to(device)), scalers)
        return {name: phys[name] for name in PREDICTED}

    return in_batches(x, batch_size, run)


@torch.no_grad()
def gpp_response(
    model: torch.nn.Module,
    scalers: Scalers,
    windows: YearWindows,
    delta_gpp: float = 1.0,
    batch_size: int = 64,
    base: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Change of Ra and Rh (gC m-2 d-1) per window-day when GPP is raised by ``delta_gpp``
    (gC m-2 d-1), computed with :func:`~kgml_peft.model.physics.perturbed_response`.

    ``base`` (the output of :func:`predict_windows` on the same windows) saves one forward pass.
    """
    model.eval()
    x = WindowDataset(windows, scalers).x
    j = windows.features.index("GPP")
    delta = delta_gpp / scalers.std["GPP"]  # the inputs are z-scores

    def predict(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return physical(model(batch), scalers)

    def run(start: int, stop: int) -> dict[str, torch.Tensor]:
        known = None if base is None else {
            name: torch.as_tensor(base[name][start:stop], dtype=torch.float32) for name in ("Ra", "Rh")
        }
        return perturbed_response(predict, x[start:stop], j, delta, base=known)

    return in_batches(x, batch_size, run)
