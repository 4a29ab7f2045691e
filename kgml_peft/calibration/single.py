"""Training one calibration unit on its own (Eq. 2 or Eq. 3 of DESIGN.md) through the one training
loop of :mod:`kgml_peft.train.loop`, with a resumable per-epoch training state:

* ``adapter`` (Eq. 3): phi_s on the frozen backbone; loss = L_pred + lambda L_phys
  + rho ||phi_s||^2 (+ mu ||theta_s - theta||^2 on weights unfrozen with ``unfreeze``);
* ``full`` (Eq. 2): every backbone weight trains; loss = L_pred + lambda L_phys + mu ||theta_s - theta||^2;
* ``scratch``: the backbone's architecture from random weights, site data only (L_pred + lambda L_phys).

Early stopping keeps the weights of the epoch with the lowest loss on the unit's held-out years
(epoch 0, the starting point, included). The backbone passed in is never modified.
"""

from __future__ import annotations

import copy
import os

import torch
from accelerate.utils import set_seed

from kgml_peft.calibration.config import CalibrationConfig
from kgml_peft.calibration.prior import prior_tensors
from kgml_peft.calibration.units import CalibrationData, CalibrationResult, finish_unit, validation_metrics
from kgml_peft.data.windows import WindowDataset
from kgml_peft.model.backbone import build_backbone
from kgml_peft.store.checkpoint import Backbone
from kgml_peft.train.loop import PhaseConfig, deterministic_algorithms, make_accelerator, run_phase
from kgml_peft.train.objectives import anchor_distance, squared_norm
from kgml_peft.train.pretrain import frame_hash
from kgml_peft.train.state import PhaseState, StateError, StateFile, TrainingState, discard_on_failure
from kgml_peft.tuners.site_model import SiteModel


def _model(backbone: Backbone, config: CalibrationConfig,
           prior: dict[str, torch.Tensor] | None = None) -> tuple[torch.nn.Module, list[str], object]:
    """The model to train, its trainable parameter patterns and its penalty (closure); with a
    ``prior`` (adapter method) the adapter starts from it and rho pulls towards it."""
    if config.method == "adapter":
        model = SiteModel(backbone.model, config.adapter, seed=config.seed)
        unfrozen = model.unfreeze(config.unfreeze) if config.unfreeze else []
        named = model.adapter_parameters()
        adapter_params = list(named.values())
        anchors = None
        if prior is not None:
            start = prior_tensors(prior, config.adapter, backbone.model)
            model.load_adapter_tensors(start)
            anchors = [start[name] for name in named]
        # SiteModel freezes the backbone: what requires grad is phi_s plus the unfrozen weights
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]

        def penalty() -> torch.Tensor:
            if anchors is None:
                loss = config.rho * squared_norm(adapter_params)
            else:  # rho ||phi - phi_nb||^2 (anchors follow the parameters' device once)
                if anchors[0].device != adapter_params[0].device:
                    anchors[:] = [a.to(p.device) for a, p in zip(anchors, adapter_params)]
                loss = config.rho * anchor_distance(zip(adapter_params, anchors))
            if unfrozen:
                loss = loss + config.mu * anchor_distance(model.anchored_pairs())
            return loss

        return model, trainable, penalty
    if config.method == "full":
        model = copy.deepcopy(backbone.model)
        model.requires_grad_(True)
        reference = [p.detach().clone() for p in model.parameters()]

        def anchor() -> torch.Tensor:
            params = list(model.parameters())
            if reference[0].device != params[0].device:  # once, after accelerate moved the model
                reference[:] = [r.to(p.device) for p, r in zip(params, reference)]
            return config.mu * anchor_distance(zip(params, reference))

        return model, ["*"], anchor
    model = build_backbone(backbone.config, seed=config.seed)
    return model, ["*"], None


def calibrate_alone(
    backbone: Backbone,
    data: CalibrationData,
    config: CalibrationConfig,
    *,
    cpu: bool = False,
    progress: bool = True,
    state: StateFile | None = None,
    local: bool = False,
) -> CalibrationResult:
    """Calibrate on one prepared unit (see :func:`prepare_unit`). With ``state`` (see
    :func:`calibration_state`) the training state is saved after every epoch, and the run
    continues from a saved one when ``state.resume`` is set. ``local``: this process calibrates
    the unit on its own while other processes calibrate others (no data parallelism)."""
    with deterministic_algorithms(), discard_on_failure(state):
        set_seed(config.seed, deterministic=True)
        return _calibrate(backbone, data, config, cpu=cpu, progress=progress, state=state, local=local)


def calibration_state(output: str | os.PathLike, backbone: Backbone, data: CalibrationData,
                      config: CalibrationConfig, resume: bool = False) -> StateFile:
    """The training-state file of the calibration that writes ``output``; its key covers the
    unit, its data, the config (seed included) and the backbone."""
    return StateFile.for_output(output, {"run": "calibrate", "unit": data.name,
                                         "config": config.to_dict(), "data": frame_hash(data.rows),
                                         "backbone": backbone.fingerprint}, resume)


def _calibrate(backbone: Backbone, data: CalibrationData, config: CalibrationConfig, *,
               cpu: bool, progress: bool, state: StateFile | None, local: bool) -> CalibrationResult:
    features = backbone.config.features
    name, train, val, weights = data.name, data.train, data.val, data.weights
    before = validation_metrics(backbone.model, backbone, val, weights, config.tolerance)

    accelerator = make_accelerator(cpu=cpu, mixed_precision=config.mixed_precision)
    model, trainable, penalty = _model(backbone, config, data.prior)
    reference = None
    if config.response_weight:
        reference = copy.deepcopy(backbone.model).eval().requires_grad_(False)
        reference = reference.to(accelerator.device)
    phase = PhaseConfig(
        name=f"calibrate {name}", data="observed", targets=weights, trainable=tuple(trainable),
        epochs=config.epochs, lr=config.lr, batch_size=config.batch_size,
        physics_weight=config.physics_weight, response_weight=config.response_weight,
        patience=config.patience, schedule=config.schedule,
    )
    prepared = model.to(accelerator.device) if local else accelerator.prepare(model)
    saved = state.load() if state is not None else None
    if saved is not None and (saved.phase_index != 0 or saved.done or saved.extra):
        raise StateError(f"{state.path} is not a calibration's training state; delete it to start over")

    def on_epoch(phase_state: PhaseState) -> None:
        state.save(TrainingState(0, phase_state))

    result = run_phase(prepared, phase, WindowDataset(train, backbone.scalers),
                       WindowDataset(val, backbone.scalers), backbone.scalers, accelerator,
                       seed=config.seed, tolerance=config.tolerance, reference=reference,
                       response_feature=features.index("GPP"), penalty=penalty, progress=progress,
                       resume=saved.phase if saved is not None else None,
                       on_epoch=on_epoch if state is not None else None, local=local)
    model = accelerator.unwrap_model(prepared).cpu().eval()
    return finish_unit(backbone, data, config, model, result, before)


