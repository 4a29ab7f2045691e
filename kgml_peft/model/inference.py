"""Batched prediction over year windows, in physical units."""

from __future__ import annotations

import numpy as np
import torch

from kgml_peft.data.windows import Scalers, WindowDataset, YearWindows
from kgml_peft.model.outputs import physical
from kgml_peft.model.physics import perturbed_response

PREDICTED = ("Ra", "Rh", "NEE", "Reco", "Yield")


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
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in PREDICTED}
    for start in range(0, len(x), batch_size):
        phys = physical(model(x[start:start + batch_size].to(device)), scalers)
        for name in PREDICTED:
            chunks[name].append(phys[name].float().cpu().numpy().astype("float64"))
    return {name: np.concatenate(parts) for name, parts in chunks.items()}


@torch.no_grad()
def gpp_response(
    model: torch.nn.Module,
    scalers: Scalers,
    windows: YearWindows,
    delta_gpp: float = 1.0,
    batch_size: int = 64,
) -> dict[str, np.ndarray]:
    """Change of Ra and Rh (gC m-2 d-1) per window-day when GPP is raised by ``delta_gpp``
    (gC m-2 d-1), computed with :func:`~kgml_peft.model.physics.perturbed_response`."""
    model.eval()
    x = WindowDataset(windows, scalers).x
    j = windows.features.index("GPP")
    delta = delta_gpp / scalers.std["GPP"]  # the inputs are z-scores

    def predict(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return physical(model(batch), scalers)

    chunks: dict[str, list[np.ndarray]] = {"Ra": [], "Rh": []}
    for start in range(0, len(x), batch_size):
        response = perturbed_response(predict, x[start:start + batch_size], j, delta)
        for name in chunks:
            chunks[name].append(response[name].float().numpy().astype("float64"))
    return {name: np.concatenate(parts) for name, parts in chunks.items()}
