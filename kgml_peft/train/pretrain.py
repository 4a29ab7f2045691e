"""Global pretraining (Eq. 1) with the staged KGML-ag schedule.

Default phases (``PretrainConfig().phases``), in order:

1. ``yield_ra``    synthetic data, Yield + Ra, trains gru_basis, the yield head and gru_ra;
2. ``fluxes``      synthetic data, Ra + Rh + NEE (+ Reco), trains everything;
3. ``yield_tune``  observed survey yields, trains only the attention and yield head;
4. ``maintain``    synthetic Ra + Rh + NEE again, so the flux branches keep their process knowledge;
5. ``observed``    flux-tower style observations (NEE, Reco with gaps), all flux branches, low lr,
                   response consistency against the model as it stood after phase 4.

Scalers are fitted once, on the training years of the synthetic data, and stored with the backbone.
"""

from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from accelerate.utils import set_seed

from kgml_peft import schema
from kgml_peft.config_files import check_keys, read_toml
from kgml_peft.data.windows import Scalers, WindowDataset, YearWindows, make_windows, split_by_year
from kgml_peft.errors import KgmlPeftError, expect_type
from kgml_peft.model import recurrence
from kgml_peft.model.backbone import BackboneConfig, KGMLag, build_backbone
from kgml_peft.train.loop import PhaseConfig, PhaseResult, deterministic_algorithms, make_accelerator, run_phase
from kgml_peft.train.state import PhaseState, StateError, StateFile, TrainingState, discard_on_failure

#: Largest layer size a new backbone may have (a typo such as 1e11 is refused before allocation)
_FLUX_BRANCHES = ("gru_ra", "ra_out", "gru_rh", "rh_out", "gru_nee", "nee_out")


def default_phases() -> tuple[PhaseConfig, ...]:
    """The demo schedule (five KGML-ag steps), sized to run in a few minutes on 2 CPU cores."""
    return (
        PhaseConfig("yield_ra", "synthetic", {"Yield": 1.0, "Ra": 1.0},
                    ("gru_basis", "attn_score", "yield_head", "gru_ra", "ra_out"),
                    epochs=12, lr=3e-3, physics_weight=0.0),
        PhaseConfig("fluxes", "synthetic", {"Ra": 1.0, "Rh": 1.0, "NEE": 1.0, "Reco": 0.5},
                    ("*",), epochs=30, lr=2e-3, physics_weight=0.1, patience=6),
        PhaseConfig("yield_tune", "observed", {"Yield": 1.0}, ("attn_score", "yield_head"),
                    epochs=10, lr=1e-3, physics_weight=0.0, patience=4),
        PhaseConfig("maintain", "synthetic", {"Ra": 1.0, "Rh": 1.0, "NEE": 1.0, "Reco": 0.5},
                    _FLUX_BRANCHES, epochs=4, lr=5e-4, physics_weight=0.1),
        PhaseConfig("observed", "observed", {"NEE": 1.0, "Reco": 1.0},
                    ("gru_basis", *_FLUX_BRANCHES), epochs=25, lr=5e-4, batch_size=16,
                    physics_weight=0.1, response_weight=0.05, patience=6),
    )


@dataclass(frozen=True)
class PretrainConfig:
    """A whole pretraining run: architecture, phases, seed, validation split, physics tolerance."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    phases: tuple[PhaseConfig, ...] = field(default_factory=default_phases)
    seed: int = 0
    val_fraction: float = 0.2
    tolerance: float = 0.05
    mixed_precision: str = "no"
    #: sites left out of every phase: new fields that join after the global model is trained
    #: (the demo's are in configs/demo.toml); each must be in the data
    exclude_sites: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        expect_type(self.seed, int, "seed")
        expect_type(self.exclude_sites, (list, tuple), "exclude_sites")
        object.__setattr__(self, "exclude_sites", tuple(self.exclude_sites))
        for site in self.exclude_sites:
            expect_type(site, str, "exclude_sites entry")
            schema.check_site_id(site, "site in exclude_sites")
        expect_type(self.val_fraction, (int, float), "val_fraction")
        expect_type(self.tolerance, (int, float), "tolerance")
        expect_type(self.mixed_precision, str, "mixed_precision")
        if not 0 <= self.val_fraction < 1:
            raise KgmlPeftError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.tolerance < 0:
            raise KgmlPeftError(f"tolerance must be >= 0, got {self.tolerance}")
        if not self.phases:
            raise KgmlPeftError("pretraining needs at least one phase")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise KgmlPeftError("mixed_precision must be no, fp16 or bf16")

    def to_dict(self) -> dict:
        """JSON-ready form (stored in the checkpoint's training summary)."""
        return {
            "backbone": self.backbone.to_dict(),
            "phases": [p.to_dict() for p in self.phases],
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "tolerance": self.tolerance,
            "mixed_precision": self.mixed_precision,
            "exclude_sites": list(self.exclude_sites),
        }

    @classmethod
    def from_dict(cls, data: dict) -> PretrainConfig:
        """Build from a dict shaped like :meth:`to_dict` (every key optional)."""
        data = dict(data)
        known = {"backbone", "phases", "seed", "val_fraction", "tolerance", "mixed_precision", "exclude_sites"}
        check_keys(data, known, "pretraining config")
        kwargs: dict = {k: data[k] for k in ("seed", "val_fraction", "tolerance", "mixed_precision",
                                             "exclude_sites") if k in data}
        if "backbone" in data:
            kwargs["backbone"] = BackboneConfig.from_dict(data["backbone"])
        if "phases" in data:
            try:
                kwargs["phases"] = tuple(PhaseConfig(**p) for p in data["phases"])
            except TypeError as exc:
                raise KgmlPeftError(f"bad phase in config: {exc}") from None
        return cls(**kwargs)

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> PretrainConfig:
        """Read a TOML config file (see ``configs/demo.toml``)."""
        source = Path(path)
        data = read_toml(source)
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError, AttributeError) as exc:  # e.g. ``backbone = 3``
            raise KgmlPeftError(f"bad value in config {source}: {exc}") from None


@dataclass
class PretrainResult:
    """The trained backbone, its scalers and the training summary stored in the checkpoint."""

    model: KGMLag
    scalers: Scalers
    summary: dict


def frame_hash(frame: pd.DataFrame) -> str:
    """SHA-256 of a table's contents (row order and columns included), for data provenance."""
    hashed = pd.util.hash_pandas_object(frame, index=False).to_numpy()
    digest = hashlib.sha256(hashed.tobytes())
    digest.update(",".join(map(str, frame.columns)).encode())
    return digest.hexdigest()


def _check_phase_targets(phase: PhaseConfig, train: YearWindows) -> None:
    """A phase must have observations of every target it trains on (else it would learn nothing)."""
    empty = [t for t in phase.targets if not np.isfinite(train.target(t)).any()]
    if empty:
        raise KgmlPeftError(
            f"phase {phase.name}: the {phase.data} data has no values for {', '.join(empty)} "
            "in its training years; provide them or drop the phase/target from the config"
        )


def with_reco(frame: pd.DataFrame) -> pd.DataFrame:
    """Add ``Reco = Ra + Rh`` where a table has Ra and Rh but no Reco column."""
    if "Reco" in frame.columns or not {"Ra", "Rh"} <= set(frame.columns):
        return frame
    return frame.assign(Reco=frame["Ra"] + frame["Rh"])


def exclude_sites(synthetic: pd.DataFrame, observed: pd.DataFrame | None,
                  sites: tuple[str, ...]) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The tables without ``sites`` (new fields the global model must not see); a site in neither
    table is refused (a typo would otherwise silently leak a new field into pretraining)."""
    if not sites:
        return synthetic, observed
    frames = [f for f in (synthetic, observed) if f is not None]
    present = set().union(*(set(f[schema.SITE].astype(str)) for f in frames))
    unknown = [s for s in sites if s not in present]
    if unknown:
        raise KgmlPeftError(f"exclude_sites names {unknown[0]!r}, which is in none of the pretraining "
                            "tables; list the site ids exactly as the tables spell them")
    kept = [f[~f[schema.SITE].astype(str).isin(sites)].reset_index(drop=True) for f in frames]
    if any(k.empty for k in kept):
        raise KgmlPeftError("exclude_sites leaves a pretraining table empty")
    return kept[0], (kept[1] if observed is not None else None)


def _split(windows: YearWindows, fraction: float) -> tuple[YearWindows, YearWindows | None]:
    train, val = split_by_year(windows, fraction)
    return windows.subset(train), (windows.subset(val) if len(val) else None)


def train_phases(
    data: dict[str, tuple[YearWindows, YearWindows | None]],
    scalers: Scalers,
    config: PretrainConfig,
    *,
    cpu: bool = False,
    progress: bool = True,
    state: StateFile | None = None,
) -> tuple[KGMLag, list[PhaseResult], list[str]]:
    """Train a backbone from random weights (``config.seed``) through ``config.phases`` on
    pre-split ``(train, validation)`` windows per data source (``synthetic``, ``observed``).

    Phases whose source is missing from ``data`` are skipped; returns the model (CPU, eval mode),
    the phase results and the skipped phase names. The caller sets seeds and determinism. With
    ``state``, the training state is saved after every epoch, and the run continues from a saved
    one when ``state.resume`` is set.

    The GRUs train through torch's kernel on every device, not the faster CPU day loop of
    :mod:`kgml_peft.model.recurrence`: the two round differently, and the shipped backbone (and
    every figure built on it) must stay rebuildable bit for bit by cli/regenerate_demo_backbone.sh.
    """
    with recurrence.strategy("kernel"):
        return _train_phases(data, scalers, config, cpu=cpu, progress=progress, state=state)


def _train_phases(data: dict[str, tuple[YearWindows, YearWindows | None]], scalers: Scalers,
                  config: PretrainConfig, *, cpu: bool, progress: bool,
                  state: StateFile | None) -> tuple[KGMLag, list[PhaseResult], list[str]]:
    set_seed(config.seed, deterministic=True)
    accelerator = make_accelerator(cpu=cpu, mixed_precision=config.mixed_precision)
    features = config.backbone.features
    sets = {k: (WindowDataset(tr, scalers), WindowDataset(va, scalers) if va is not None else None)
            for k, (tr, va) in data.items()}
    for phase in config.phases:  # fail before any training, not in the middle of it
        if phase.data in data:
            _check_phase_targets(phase, data[phase.data][0])

    model = build_backbone(config.backbone, seed=config.seed)
    saved = state.load() if state is not None else None
    if saved is not None and (saved.phase_index >= len(config.phases)
                              or len(saved.done) > saved.phase_index):
        raise StateError(f"{state.path} does not fit this run's {len(config.phases)} phases; "
                         "delete it to start over")
    results: list[PhaseResult] = list(saved.done) if saved else []
    model = accelerator.prepare(model)
    reference: KGMLag | None = None
    if saved and saved.extra:
        # copied from the prepared model, as in an uninterrupted run (under mixed precision the
        # unwrapped model keeps accelerate's fp32 output conversion, and so must the reference)
        reference = copy.deepcopy(accelerator.unwrap_model(model)).eval()
        try:
            reference.load_state_dict(saved.extra)
        except RuntimeError as exc:
            raise StateError(f"{state.path}: the saved reference model does not fit "
                             f"({str(exc).splitlines()[0]}); delete it to start over") from None
        reference.requires_grad_(False)
    gpp_index = features.index("GPP")
    skipped: list[str] = []
    step = sum(r.steps for r in results)
    for i, phase in enumerate(config.phases):
        if phase.data not in sets:
            skipped.append(phase.name)
            continue
        if saved is not None and i < saved.phase_index:
            continue  # finished before the interruption; its result is in saved.done
        if phase.response_weight and reference is None:
            reference = copy.deepcopy(accelerator.unwrap_model(model)).eval()
            for p in reference.parameters():
                p.requires_grad_(False)

        def on_epoch(phase_state: PhaseState, i: int = i, ref: KGMLag | None = reference) -> None:
            extra = ref.state_dict() if ref is not None else {}
            state.save(TrainingState(i, phase_state, results, extra))

        train_set, val_set = sets[phase.data]
        result = run_phase(model, phase, train_set, val_set, scalers, accelerator,
                           seed=config.seed + i, tolerance=config.tolerance, step_offset=step,
                           reference=reference, response_feature=gpp_index, progress=progress,
                           resume=saved.phase if saved is not None and i == saved.phase_index else None,
                           on_epoch=on_epoch if state is not None and accelerator.is_main_process else None)
        step += result.steps
        results.append(result)
    return accelerator.unwrap_model(model).cpu().eval(), results, skipped


def pretrain(
    synthetic: pd.DataFrame,
    observed: pd.DataFrame | None = None,
    config: PretrainConfig | None = None,
    *,
    cpu: bool = False,
    progress: bool = True,
    state: StateFile | None = None,
) -> PretrainResult:
    """Run Eq. 1's staged pretraining on validated tables and return the trained backbone.

    Phases whose data is ``observed`` are skipped (and recorded as skipped) when ``observed`` is
    ``None``. Same tables, config and seed give the same weights on CPU. With ``state`` (see
    :func:`pretrain_state`) the training state is saved after every epoch and, when
    ``state.resume`` is set, the run continues from a saved one; the caller discards it once the
    checkpoint is written.
    """
    config = config or PretrainConfig()
    with deterministic_algorithms(), discard_on_failure(state):
        return _pretrain(synthetic, observed, config, cpu=cpu, progress=progress, state=state)


def pretrain_state(output: str | os.PathLike, synthetic: pd.DataFrame, observed: pd.DataFrame | None,
                   config: PretrainConfig, resume: bool = False) -> StateFile:
    """The training-state file of the pretraining run that writes ``output``."""
    hashes = {"synthetic": frame_hash(with_reco(synthetic)),
              "observed": frame_hash(observed) if observed is not None else None}
    return StateFile.for_output(output, {"run": "pretrain", "config": config.to_dict(), "data": hashes},
                                resume)


def _pretrain(
    synthetic: pd.DataFrame,
    observed: pd.DataFrame | None,
    config: PretrainConfig,
    *,
    cpu: bool,
    progress: bool,
    state: StateFile | None,
) -> PretrainResult:
    features = config.backbone.features
    data: dict[str, tuple[YearWindows, YearWindows | None]] = {}
    synthetic, observed = exclude_sites(synthetic, observed, config.exclude_sites)
    synthetic = with_reco(synthetic)
    data["synthetic"] = _split(make_windows(synthetic, features), config.val_fraction)
    if observed is not None:
        data["observed"] = _split(make_windows(observed, features), config.val_fraction)
    scalers = Scalers.fit(data["synthetic"][0])
    scalers.require([*features, *schema.TARGETS])
    model, results, skipped = train_phases(data, scalers, config, cpu=cpu, progress=progress,
                                           state=state)
    step = sum(r.steps for r in results)
    summary = {
        "config": config.to_dict(),
        "data": {
            name: {
                "hash": frame_hash(frame),
                "sites": int(frame[schema.SITE].nunique()),
                "train_site_years": len(data[name][0]),
                "val_site_years": len(data[name][1]) if data[name][1] is not None else 0,
                "first_date": str(frame[schema.DATE].min().date()),
                "last_date": str(frame[schema.DATE].max().date()),
            }
            for name, frame in (("synthetic", synthetic), ("observed", observed))
            if frame is not None
        },
        "phases": [
            {"name": r.name, "steps": r.steps, "best_epoch": r.best_epoch,
             "best_val_loss": r.best_val_loss} for r in results
        ],
        "skipped_phases": skipped,
        "curves": [entry for r in results for entry in r.curve],
        "total_steps": step,
    }
    return PretrainResult(model=model, scalers=scalers, summary=summary)
