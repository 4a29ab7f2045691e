"""One Accelerate training loop for every phase of pretraining and for site calibration.

A phase names its data, its target weights, which parameters train, epochs, learning rate (constant
or cosine), batch size and the physics weight; a ``penalty`` hook adds Eq. 2/3 regularisers. The loop runs on whatever device Accelerate picks (``--cpu`` forces CPU),
supports mixed precision, logs the validation loss after every epoch with the global optimizer step,
stops early when the validation loss stops improving and restores the best weights of the phase.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from kgml_peft import schema
from kgml_peft.data.windows import Scalers, WindowDataset
from kgml_peft.errors import KgmlPeftError, expect_type
from kgml_peft.model.outputs import physical, scaled_targets
from kgml_peft.train.objectives import objective, target_errors
from kgml_peft.train.processes import use_cpu
from kgml_peft.train.state import PhaseResult, PhaseState, StateError, capture_rng, restore_rng

DATA_SOURCES = ("synthetic", "observed")
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class PhaseConfig:
    """One stage of training: data, targets (name -> loss weight), trainable modules, optimiser."""

    name: str
    data: str = "synthetic"
    targets: dict[str, float] = field(default_factory=lambda: {"Ra": 1.0, "Rh": 1.0, "NEE": 1.0})
    #: parameter-name prefixes or glob patterns that train (``"*"`` = all); everything else is
    #: frozen in this phase
    trainable: tuple[str, ...] = ("*",)
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 32
    weight_decay: float = 0.0
    physics_weight: float = 0.1
    response_weight: float = 0.0
    #: epochs without validation improvement before stopping (0 = run all epochs)
    patience: int = 0
    #: also log the validation loss every N optimizer steps within an epoch (0 = at epoch ends
    #: only); early stopping and the best-weights choice still look at epoch ends
    val_every: int = 0
    #: learning rate over the phase: ``constant`` or ``cosine`` (decays to 0 at the last step)
    schedule: str = "constant"

    def __post_init__(self) -> None:
        expect_type(self.name, str, "phase name")
        for key in ("epochs", "batch_size", "patience", "val_every"):
            expect_type(getattr(self, key), int, f"phase {self.name}: {key}")
        for key in ("lr", "weight_decay", "physics_weight", "response_weight"):
            expect_type(getattr(self, key), (int, float), f"phase {self.name}: {key}")
        expect_type(self.targets, dict, f"phase {self.name}: targets")
        expect_type(self.trainable, (list, tuple), f"phase {self.name}: trainable")
        for weight in self.targets.values():
            expect_type(weight, (int, float), f"phase {self.name}: target weight")
        expect_type(self.schedule, str, f"phase {self.name}: schedule")
        if self.schedule not in SCHEDULES:
            raise KgmlPeftError(f"phase {self.name}: schedule must be one of {SCHEDULES}")
        if self.data not in DATA_SOURCES:
            raise KgmlPeftError(f"phase {self.name}: data must be one of {DATA_SOURCES}")
        unknown = [t for t in self.targets if t not in schema.TARGETS]
        if unknown:
            raise KgmlPeftError(f"phase {self.name}: unknown target {unknown[0]!r}")
        if not self.targets:
            raise KgmlPeftError(f"phase {self.name}: no targets")
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0 or self.val_every < 0:
            raise KgmlPeftError(
                f"phase {self.name}: epochs >= 0, batch_size >= 1, lr > 0, val_every >= 0 needed"
            )
        for key in ("epochs", "batch_size", "patience", "val_every"):  # a typo is refused, not looped over
            if getattr(self, key) > 100_000:
                raise KgmlPeftError(f"phase {self.name}: {key} must be <= 100000, got {getattr(self, key)}")
        object.__setattr__(self, "trainable", tuple(self.trainable))
        object.__setattr__(self, "targets", {k: float(v) for k, v in self.targets.items()})

    def to_dict(self) -> dict:
        """JSON-ready form."""
        data = asdict(self)
        data["trainable"] = list(self.trainable)
        return data


@contextlib.contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """Run the body with torch's deterministic algorithms on (warn-only where an op has none), then
    restore the caller's setting: same data, config and seed give the same weights on CPU."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def make_accelerator(cpu: bool = False, mixed_precision: str = "no") -> Accelerator:
    """An Accelerator for one run. Accelerate keeps one process-wide state and refuses a second
    Accelerator with another precision, so an earlier run's accelerator-level state is cleared
    first (the distributed process state is kept: this stays correct under ``accelerate launch``)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)  # no public API for this
    # Phases freeze different parts of the backbone: under DDP, parameters that get no gradient
    # in a phase must not hold up the gradient all-reduce (no effect in a single process).
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    return Accelerator(cpu=use_cpu(cpu), mixed_precision=mixed_precision, kwargs_handlers=[ddp])


def set_trainable(model: torch.nn.Module, patterns: Sequence[str]) -> list[torch.nn.Parameter]:
    """Freeze every parameter except those whose name starts with, or matches (glob), one of
    ``patterns``; return the trainable ones."""
    params = []
    for name, param in model.named_parameters():
        train = any(name.startswith(p) or fnmatch.fnmatchcase(name, p) for p in patterns)
        param.requires_grad_(train)
        if train:
            params.append(param)
    if not params:
        raise KgmlPeftError(f"no parameter matches the trainable patterns {list(patterns)}")
    return params


def validation_loss(
    model: torch.nn.Module,
    loader: DataLoader,
    scalers: Scalers,
    weights: dict[str, float],
    accelerator: Accelerator,
    local: bool = False,
) -> float:
    """Weighted masked MSE (scaled units) of the phase's targets over a whole loader (gathered
    over every process, unless ``local``: the loader holds this process's own data)."""
    names = tuple(weights)
    model.eval()
    sse_total = torch.zeros(len(names), dtype=torch.float64)
    count_total = torch.zeros(len(names), dtype=torch.float64)
    with torch.no_grad():
        for batch in _on_device(loader, accelerator.device if local else None):
            with accelerator.autocast():
                out = model(batch["x"])
            out = {k: v.float() for k, v in out.items() if k != "state"}
            sse, count = target_errors(scaled_targets(out, scalers, physical(out, scalers)), batch, names)
            if not local:
                sse, count = accelerator.gather_for_metrics((sse, count))
            sse_total += sse.double().sum(0).cpu()
            count_total += count.double().sum(0).cpu()
    return weighted_mse(sse_total, count_total, weights)


def weighted_mse(sse: torch.Tensor, count: torch.Tensor, weights: dict[str, float]) -> float:
    """The weighted mean of per-target MSEs from summed squared errors and observation counts
    (one entry per target of ``weights``, in its order); targets never observed do not count."""
    names = tuple(weights)
    per_target = sse / count.clamp_min(1.0)
    # a target without a single validation observation does not count (its error would read 0)
    w = torch.tensor([weights[n] for n in names], dtype=torch.float64) * (count > 0)
    if not w.sum() > 0:
        raise KgmlPeftError(f"the validation data has no observation of {', '.join(names)}")
    return float((per_target * w).sum() / w.sum())


def _on_device(loader, device: torch.device | None) -> Iterator[dict]:
    """The loader's batches, moved to ``device`` (``None``: the loader places them itself)."""
    for batch in loader:
        yield batch if device is None else {k: v.to(device) for k, v in batch.items()}


#: A phase has diverged when a loss exceeds this many times its starting value (or 1, if larger):
#: scaled losses are of order 1, and no converging run comes near (a diverging one, e.g. lr 10
#: on an adapter, jumps by 10^6 in one epoch while the weights stay finite).
DIVERGENCE_FACTOR = 1e3


def _check_divergence(name: str, epoch: int, curve: list[dict], train_loss: float,
                      val_loss: float | None) -> None:
    """Raise :class:`KgmlPeftError` if the validation loss (or, without validation data, the
    training loss) is not finite or has grown past ``DIVERGENCE_FACTOR`` times its start."""
    if val_loss is not None:
        start, now, what = curve[0]["val_loss"], val_loss, "validation"
    else:
        start = next((c["train_loss"] for c in curve if c["train_loss"] is not None), train_loss)
        now, what = train_loss, "training"
    if not math.isfinite(now) or now > DIVERGENCE_FACTOR * max(start, 1.0):
        raise KgmlPeftError(f"phase {name} diverged: the {what} loss rose from {start:.4g} to {now:.4g} "
                            f"at epoch {epoch}; lower the learning rate")


def close_epoch(result: PhaseResult, epoch: int, step: int, train_loss: float, val_loss: float | None,
                stale: int, patience: int) -> tuple[bool, int, bool]:
    """End an epoch of ``result``'s phase: check divergence, log it in the curve and track the best
    epoch. Returns whether it improved (keep its weights), the epochs without improvement since,
    and whether ``patience`` (0 = never) says stop."""
    _check_divergence(result.name, epoch, result.curve, train_loss, val_loss)
    result.curve.append({"phase": result.name, "epoch": epoch, "step": step,
                         "train_loss": train_loss, "val_loss": val_loss})
    improved = val_loss is None or result.best_val_loss is None or val_loss < result.best_val_loss
    if improved:
        result.best_epoch, result.best_val_loss, stale = epoch, val_loss, 0
    else:
        stale += 1
    return improved, stale, bool(patience) and stale >= patience


@dataclass
class Member:
    """One unit a training run fits: its batches, its step count, its early stopping and best
    weights. :func:`run_phase` fits one; batched calibration fits several side by side, each with
    its own data order, learning rate schedule and stopping epoch."""

    result: PhaseResult
    #: this epoch's batches (a fresh iterator per call)
    batches: Callable[[], Iterator[dict]]
    #: a copy of the weights to keep when an epoch improves
    snapshot: Callable[[], dict]
    #: optimizer steps so far (the curve's ``step``; a phase may start counting at an offset)
    step: int = 0
    #: epochs without improvement before this member stops (None: the run's patience)
    patience: int | None = None
    best: dict | None = None
    stale: int = 0
    stopped: bool = False
    #: this epoch's optimizer steps and the running total of their training losses (a running
    #: total, not ``sum()``: Python 3.12's ``sum`` rounds differently, and logged curves must not
    #: depend on the Python version)
    done: int = 0
    total: float = 0.0


def check_finite(name: str, value: float, epoch: int) -> None:
    """Stop a phase whose training loss is no longer a number (before its optimizer steps)."""
    if not math.isfinite(value):
        raise KgmlPeftError(f"phase {name}: the loss became {value} at epoch {epoch}; lower the learning rate")


def fit(
    members: Sequence[Member],
    *,
    epochs: int,
    patience: int,
    step: Callable[[list[tuple[Member, dict]], int], list[float]],
    validate: Callable[[list[Member]], list[float | None]],
    train_mode: Callable[[], None],
    first_epoch: int = 1,
    desc: str = "train",
    progress: bool = True,
    after_step: Callable[[list[Member], int], None] | None = None,
    reduce: Callable[[float], float] | None = None,
    on_epoch: Callable[[int], None] | None = None,
    postfix: Callable[[Sequence[Member]], dict] | None = None,
) -> None:
    """The epoch loop every training run goes through: pretraining phases, one calibration and
    many calibrations side by side.

    With ``first_epoch`` 1 the members are validated first (the curve's epoch 0, the first best
    weights). Each epoch takes every member that has not stopped, steps them together batch by
    batch (``step(pairs, epoch)`` gets ``[(member, its next batch)]`` for the members that still
    have one and returns their training losses; ``after_step`` sees them after), validates them
    (``validate(members)``), and closes each member's epoch with :func:`close_epoch`: divergence
    check, curve entry, best weights, patience. ``reduce`` turns a member's mean training loss into
    the figure every process agrees on; ``on_epoch(epoch)`` runs at each epoch's end (to save a
    training state). The loop ends after ``epochs`` or when every member has stopped.
    """
    if first_epoch == 1:
        for member, val_loss in zip(members, validate(list(members))):
            member.result.curve.append({"phase": member.result.name, "epoch": 0, "step": member.step,
                                        "train_loss": None, "val_loss": val_loss})
            member.result.best_val_loss = val_loss
            member.best = member.snapshot()
    bar = tqdm(range(first_epoch, epochs + 1), desc=desc, leave=False, disable=not progress, unit="epoch",
               initial=first_epoch - 1, total=epochs)
    for epoch in bar:
        active = [m for m in members if not m.stopped]
        if not active:
            break
        train_mode()
        iterators = {id(m): m.batches() for m in active}
        for member in active:
            member.done, member.total = 0, 0.0
        while True:
            pairs = [(m, b) for m in active if (b := next(iterators[id(m)], None)) is not None]
            if not pairs:
                break
            for (member, _), value in zip(pairs, step(pairs, epoch)):
                member.total += value
                member.done += 1
                member.step += 1
            if after_step is not None:
                after_step([m for m, _ in pairs], epoch)
        for member, val_loss in zip(active, validate(active)):
            train_loss = member.total / max(member.done, 1)
            if reduce is not None:
                train_loss = reduce(train_loss)
            improved, member.stale, member.stopped = close_epoch(
                member.result, epoch, member.step, train_loss, val_loss, member.stale,
                patience if member.patience is None else member.patience)
            if improved:
                member.best = member.snapshot()
        if on_epoch is not None:
            on_epoch(epoch)
        if postfix is not None:
            bar.set_postfix(**postfix(members))
    bar.close()


def run_phase(
    model: torch.nn.Module,
    phase: PhaseConfig,
    train_set: WindowDataset,
    val_set: WindowDataset | None,
    scalers: Scalers,
    accelerator: Accelerator,
    *,
    seed: int,
    tolerance: float,
    step_offset: int = 0,
    reference: torch.nn.Module | None = None,
    response_feature: int | None = None,
    penalty: Callable[[], torch.Tensor] | None = None,
    progress: bool = True,
    resume: PhaseState | None = None,
    on_epoch: Callable[[PhaseState], None] | None = None,
    local: bool = False,
) -> PhaseResult:
    """Train ``model`` (already prepared by ``accelerator``) for one phase; keep its best weights.

    ``penalty`` (no arguments) returns a regulariser added to every step's loss, e.g. Eq. 2's
    mu-anchor or Eq. 3's rho-norm (:mod:`kgml_peft.train.objectives`). ``on_epoch`` receives the
    phase's state after every epoch (to save it); ``resume`` continues from such a state, with the
    same result as a run that was never interrupted. The epochs run through :func:`fit`.

    Under several processes (``accelerate launch``, ``torchrun``) the phase is data-parallel:
    ``model`` is DDP-wrapped by the caller, each process takes its share of every batch (the
    config's batch size stays the global one), and the losses that decide early stopping are
    averaged over processes, so that every process decides alike. With ``local`` the phase is
    this process's own (``model`` merely placed on the device, not wrapped): one of many site
    calibrations sharded across processes.
    """
    shared = accelerator.num_processes > 1 and not local
    raw = accelerator.unwrap_model(model)
    was_trainable = {name: p.requires_grad for name, p in raw.named_parameters()}
    params = set_trainable(raw, phase.trainable)
    optimizer = torch.optim.Adam(params, lr=phase.lr, weight_decay=phase.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    # the batch size is global: each of N data-parallel processes takes 1/N of a batch
    batch_size = math.ceil(phase.batch_size / accelerator.num_processes) if shared else phase.batch_size
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=generator)
    # The validation loader gets its own generator: iterating a loader otherwise draws from the
    # global RNG, and validating would then change the dropout masks of the following steps.
    val_loader = (DataLoader(val_set, batch_size=max(batch_size, 64),
                             generator=torch.Generator().manual_seed(seed)) if val_set else None)
    if local:  # this process's own data: not sharded, batches placed here
        optimizer = accelerator.prepare_optimizer(optimizer)
    else:
        optimizer, train_loader = accelerator.prepare(optimizer, train_loader)
        if val_loader is not None:
            val_loader = accelerator.prepare(val_loader)
    device = accelerator.device if local else None
    # Stepped by hand once per optimizer step over this process's batches (an accelerate-prepared
    # scheduler would step once per process and needs the global step count instead).
    total_steps = max(phase.epochs * len(train_loader), 1)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
                 if phase.schedule == "cosine" else None)

    member = Member(PhaseResult(name=phase.name), lambda: _on_device(train_loader, device),
                    lambda: copy.deepcopy(raw.state_dict()), step=step_offset)
    first = 1
    if resume is not None:
        member.result, member.best, first, member.step, member.stale = _restore(
            resume, raw, optimizer, scheduler, accelerator, generator, phase)

    def validate(_members: list[Member]) -> list[float | None]:
        if val_loader is None:
            return [None]
        return [validation_loss(model, val_loader, scalers, phase.targets, accelerator, local)]

    def step(pairs: list[tuple[Member, dict]], epoch: int) -> list[float]:
        [(_, batch)] = pairs
        with accelerator.autocast():
            loss = objective(model, batch, scalers, phase.targets, phase.physics_weight,
                             tolerance, reference, phase.response_weight, response_feature)
            if penalty is not None:
                loss = loss + penalty()
        value = float(loss.detach())
        check_finite(phase.name, value, epoch)
        optimizer.zero_grad()
        accelerator.backward(loss)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        return [value]

    def after_step(_members: list[Member], epoch: int) -> None:
        if (phase.val_every and val_loader is not None and member.step % phase.val_every == 0
                and member.done < len(train_loader)):  # the epoch end logs its own entry
            member.result.curve.append({
                "phase": phase.name, "epoch": epoch, "step": member.step,
                "train_loss": member.total / member.done,
                "val_loss": validation_loss(model, val_loader, scalers, phase.targets, accelerator, local),
            })
            model.train()

    def reduce(train_loss: float) -> float:  # one figure for all processes: they decide alike
        return float(accelerator.reduce(torch.tensor(train_loss, device=accelerator.device), "mean"))

    def save_state(epoch: int) -> None:
        on_epoch(PhaseState(
            epoch=epoch, step=member.step, stale=member.stale, stopped=member.stopped,
            result=copy.deepcopy(member.result), model=raw.state_dict(), best_model=member.best,
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict() if scheduler is not None else None,
            scaler=accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            rng=capture_rng(generator),
        ))

    def postfix(_members: Sequence[Member]) -> dict:
        val_loss = member.result.curve[-1]["val_loss"]
        return {"train": f"{member.result.curve[-1]['train_loss']:.4f}",
                "val": f"{val_loss:.4f}" if val_loss is not None else "-"}

    fit([member], epochs=phase.epochs, patience=phase.patience, step=step, validate=validate,
        train_mode=model.train, first_epoch=first, desc=phase.name,
        progress=progress and accelerator.is_local_main_process, after_step=after_step,
        reduce=reduce if shared else None, on_epoch=save_state if on_epoch is not None else None,
        postfix=postfix)
    raw.load_state_dict(member.best)
    for name, p in raw.named_parameters():
        p.requires_grad_(was_trainable[name])
    result = member.result
    result.steps = member.step - step_offset
    model.eval()
    return result


def _restore(state: PhaseState, raw: torch.nn.Module, optimizer, scheduler, accelerator: Accelerator,
             generator: torch.Generator, phase: PhaseConfig) -> tuple[PhaseResult, dict, int, int, int]:
    """Put a phase back where ``state`` left it; return its result so far, best weights, the next
    epoch, the step count and the epochs without improvement. A state that does not fit this
    model and optimizer is refused with :class:`StateError`."""
    if state.result.name != phase.name:
        raise StateError(f"the saved training state is of phase {state.result.name!r}, not {phase.name!r}")
    try:
        raw.load_state_dict(state.model)
        copy.deepcopy(raw).load_state_dict(state.best_model)  # the best weights must fit too
        best_state = {k: v.clone() for k, v in state.best_model.items()}
        optimizer.load_state_dict(state.optimizer)
        for group in optimizer.param_groups:
            for param in group["params"]:
                for name, value in optimizer.state.get(param, {}).items():
                    if name != "step" and isinstance(value, torch.Tensor) and value.shape != param.shape:
                        raise ValueError(f"optimizer state {name} has shape {list(value.shape)}, "
                                         f"its parameter {list(param.shape)}")
        if scheduler is not None:
            scheduler.load_state_dict(state.scheduler)
        if accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(state.scaler)
        restore_rng(state.rng, generator)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise StateError(f"the saved training state does not fit phase {phase.name} ({first}); "
                         "delete it to start over") from None
    result = copy.deepcopy(state.result)
    # a stopped phase runs no more epochs: the loop starts past its end
    first_epoch = phase.epochs + 1 if state.stopped else state.epoch + 1
    return result, best_state, first_epoch, state.step, state.stale
