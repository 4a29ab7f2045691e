"""Training state on disk, so that an interrupted pretraining or calibration continues (``--resume``).

After every epoch the training loop hands over a :class:`PhaseState`: model and best weights, Adam's
moments, the learning-rate schedule, the RNG states (global, CUDA and the loader's shuffle) and the
phase's curve so far. :class:`StateFile` writes it, atomically, to
``<output folder>/.kgml-resume/<output file name>`` as one safetensors file: tensors plus JSON
metadata, no pickle (``torch.save``, the usual way to checkpoint an optimizer, pickles; so the
optimizer's state dict is split here into tensors and JSON by hand). Continuing from such a state
gives the same weights, bit for bit on CPU, as a run that was never interrupted.

A run key (SHA-256 of the config, the data hashes, the seed and the backbone) ties a state to its
run: a state written by another run is refused instead of being mixed into this one. The file is
removed once the run's output is written.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from kgml_peft.errors import KgmlPeftError
from kgml_peft.atomic import atomic_path
from kgml_peft.store.hashing import content_hash, read_safetensors

RESUME_DIR = ".kgml-resume"
FORMAT = "kgml-peft/training-state"
FORMAT_VERSION = "1"


class StateError(KgmlPeftError):
    """A saved training state that cannot be used (corrupt, foreign, or another run's)."""


@dataclass
class PhaseResult:
    """What a phase did: its curve (one entry per epoch), best epoch and optimizer steps."""

    name: str
    curve: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val_loss: float | None = None
    steps: int = 0


@dataclass
class PhaseState:
    """A phase after its ``epoch``-th epoch: everything :func:`~kgml_peft.train.loop.run_phase`
    needs to carry on as if it had never stopped."""

    epoch: int
    step: int
    stale: int
    stopped: bool
    result: PhaseResult
    model: dict[str, torch.Tensor]
    best_model: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict | None = None
    scaler: dict | None = None
    rng: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class TrainingState:
    """A run's position: the phase it is in (``phase_index``), that phase's state, the results of
    the phases before it and extra tensors the run keeps (e.g. a frozen reference model)."""

    phase_index: int
    phase: PhaseState
    done: list[PhaseResult] = field(default_factory=list)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


def capture_rng(loader: torch.Generator) -> dict[str, torch.Tensor]:
    """The RNG states a training epoch draws from: the global CPU generator, every CUDA device's
    and the loader's shuffle generator."""
    states = {"torch": torch.get_rng_state(), "loader": loader.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda.{i}"] = state
    return states


def restore_rng(states: dict[str, torch.Tensor], loader: torch.Generator) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(states["torch"])
    loader.set_state(states["loader"])
    cuda = [states[k] for k in sorted((k for k in states if k.startswith("cuda.")),
                                      key=lambda k: int(k.split(".")[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def resume_path(output: str | os.PathLike) -> Path:
    """Where the training state of a run writing ``output`` lives."""
    target = Path(output)
    return target.parent / RESUME_DIR / target.name


def run_key(description: dict) -> str:
    """SHA-256 (hex) of a JSON-ready description of a run (config, data hashes, backbone), with
    the toolkit and torch versions: a state is only resumed by the code that wrote it."""
    from kgml_peft import __version__

    return content_hash({**description, "toolkit": __version__, "torch": torch.__version__}, {})


def _cpu(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors that share memory, and the caller keeps training
    return {f"{prefix}{k}": v.detach().cpu().clone().contiguous() for k, v in tensors.items()}


def _split_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, plain = {}, {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().clone().contiguous()
            else:
                plain.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "plain": plain}


def _join_optimizer(tensors: dict[str, torch.Tensor], header: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, values in header["plain"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": header["param_groups"]}


def save_state(path: str | os.PathLike, key: str, state: TrainingState) -> None:
    """Write ``state`` atomically to ``path`` (its folder is created)."""
    phase = state.phase
    optim_tensors, optim_header = _split_optimizer(phase.optimizer)
    tensors = {**_cpu(phase.model, "model."), **_cpu(phase.best_model, "best."),
               **_cpu(phase.rng, "rng."), **_cpu(state.extra, "extra."), **optim_tensors}
    header = {
        "phase_index": state.phase_index,
        "epoch": phase.epoch, "step": phase.step, "stale": phase.stale, "stopped": phase.stopped,
        "result": asdict(phase.result),
        "done": [asdict(r) for r in state.done],
        "optimizer": optim_header,
        "scheduler": phase.scheduler,
        "scaler": phase.scaler,
    }
    text = json.dumps(header, sort_keys=True)
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "run_key": key, "state": text,
                "content_hash": content_hash({"run_key": key, "state": text}, tensors)}
    target = Path(path)
    try:
        for attempt in range(3):
            # another run of the same output may remove the (empty) folder between mkdir and write
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with atomic_path(target) as tmp:
                    save_file(tensors, str(tmp), metadata=metadata)
                return
            except (FileNotFoundError, KgmlPeftError):
                if attempt == 2 or target.parent.is_dir():
                    raise
    except (OSError, KgmlPeftError) as exc:  # a full disk, a file where the folder should be
        raise StateError(f"cannot write the training state {target} ({exc})") from None


def _group(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_state(path: str | os.PathLike, key: str) -> TrainingState:
    """Read a state written by :func:`save_state` for the run ``key``; a foreign, corrupt or
    other run's file is refused with :class:`StateError`."""
    source = Path(path)
    try:
        tensors, metadata = read_safetensors(source, "training state")
    except KgmlPeftError as exc:
        raise StateError(f"{exc}; delete it to start over") from None
    if metadata.get("format") != FORMAT or metadata.get("format_version") != FORMAT_VERSION:
        raise StateError(f"{source} is not a kgml-peft training state of format version "
                            f"{FORMAT_VERSION}; delete it to start over")
    if metadata.get("run_key") != key:
        raise StateError(f"{source} was written by another run (its config, data, seed, backbone "
                         "or toolkit version differ); run without --resume to start over")
    text = metadata.get("state", "")
    if metadata.get("content_hash") != content_hash({"run_key": key, "state": text}, tensors):
        raise StateError(f"{source}: content hash mismatch, the training state is corrupt; "
                         "delete it to start over")
    try:
        header = json.loads(text)
        phase = PhaseState(
            epoch=_count(header["epoch"]), step=_count(header["step"]), stale=_count(header["stale"]),
            stopped=_flag(header["stopped"]), result=PhaseResult(**header["result"]),
            model=_group(tensors, "model."), best_model=_group(tensors, "best."),
            optimizer=_join_optimizer(_group(tensors, "optim."), header["optimizer"]),
            scheduler=header["scheduler"], scaler=header["scaler"], rng=_group(tensors, "rng."),
        )
        done = [PhaseResult(**r) for r in header["done"]]
        index = _count(header["phase_index"])
        if {"torch", "loader"} - set(phase.rng):
            raise ValueError("no RNG state")
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as exc:
        raise StateError(f"{source} has an unreadable training state ({exc}); delete it to "
                         "start over") from None
    return TrainingState(phase_index=index, phase=phase, done=done, extra=_group(tensors, "extra."))


def _count(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{value!r} is not a count")
    return value


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} is not true or false")
    return value


@dataclass(frozen=True)
class StateFile:
    """Where one run keeps its training state, the run's key, and whether to continue from it."""

    path: Path
    key: str
    resume: bool = False

    @classmethod
    def for_output(cls, output: str | os.PathLike, description: dict,
                   resume: bool = False) -> StateFile:
        """The state file of the run that writes ``output`` (described by ``description``)."""
        return cls(resume_path(output), run_key(description), resume)

    def load(self) -> TrainingState | None:
        """The saved state to continue from, or ``None`` (not resuming, or nothing saved)."""
        if not self.resume or not self.path.exists():
            return None
        return load_state(self.path, self.key)

    def save(self, state: TrainingState) -> None:
        """Write ``state`` (atomically)."""
        save_state(self.path, self.key, state)

    def discard(self) -> None:
        """Remove the state (and its folder, once empty): the run's output is written."""
        self.path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.path.parent.rmdir()

    def discard_if_ours(self) -> None:
        """Remove the state only if this run wrote it (another run's progress is kept)."""
        try:
            if load_state(self.path, self.key) is not None:
                self.discard()
        except StateError:
            pass



@contextlib.contextmanager
def discard_on_failure(state: StateFile | None) -> Iterator[None]:
    """Remove ``state`` when the body fails with :class:`KgmlPeftError` (a diverged run, bad data:
    resuming would fail the same way); any other interruption keeps it for ``--resume``, and so
    does a refused state (:class:`StateError`: the user decides what to do with it)."""
    try:
        yield
    except StateError:
        raise
    except KgmlPeftError:
        if state is not None:
            state.discard()
        raise
