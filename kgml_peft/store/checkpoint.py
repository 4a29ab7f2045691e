"""Backbone checkpoints: one safetensors file, tensors + JSON metadata, fingerprinted. No pickle.

Layout of ``checkpoints/<name>.safetensors``:

* tensors: the backbone's ``state_dict`` under its own names (``gru_basis.weight_ih_l0`` ...),
  float32;
* ``__metadata__`` (strings): ``format`` = ``kgml-peft/backbone``, ``format_version``, ``config``
  (JSON :class:`~kgml_peft.model.backbone.BackboneConfig`), ``features``, ``targets``, ``scalers``
  (JSON means/stds), ``training`` (JSON summary: seed, phases, data hashes, validation curves),
  ``fingerprint``, ``toolkit_version``, ``torch_version``.

The fingerprint is a SHA-256 over the canonical JSON of the config and scalers and over every
tensor's name, dtype, shape and bytes: everything that decides the backbone's predictions, and
nothing else (training logs do not change it). Adapters record it and are refused on a backbone
with another fingerprint.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from kgml_peft import __version__, schema
from kgml_peft.data.windows import Scalers
from kgml_peft.errors import KgmlPeftError
from kgml_peft.model.backbone import BackboneConfig, KGMLag
from kgml_peft.atomic import atomic_path
from kgml_peft.store.hashing import content_hash, read_safetensors

FORMAT = "kgml-peft/backbone"
FORMAT_VERSION = "1"


@dataclass
class Backbone:
    """A loaded backbone: the model (eval mode), its config, scalers, fingerprint and metadata."""

    model: KGMLag
    config: BackboneConfig
    scalers: Scalers
    fingerprint: str
    training: dict = field(default_factory=dict)
    path: Path | None = None


def fingerprint(
    state_dict: dict[str, torch.Tensor], config: BackboneConfig, scalers: Scalers
) -> str:
    """SHA-256 (hex) of config, scalers and tensors (names, dtypes, shapes, bytes)."""
    return content_hash({"config": config.to_dict(), "scalers": scalers.to_dict()}, state_dict)


def save_backbone(
    path: str | os.PathLike,
    model: KGMLag,
    scalers: Scalers,
    training: dict | None = None,
) -> str:
    """Write ``model`` with its scalers and training summary atomically; return the fingerprint."""
    config = model.config
    scalers.require([*config.features, *schema.TARGETS])
    tensors = {k: v.detach().cpu().float().contiguous() for k, v in model.state_dict().items()}
    fp = fingerprint(tensors, config, scalers)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(config.to_dict(), sort_keys=True),
        "features": json.dumps(list(config.features)),
        "targets": json.dumps(list(schema.TARGETS)),
        "scalers": json.dumps(scalers.to_dict(), sort_keys=True),
        "training": json.dumps(training or {}, sort_keys=True, allow_nan=False),
        "fingerprint": fp,
        "toolkit_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return fp


def read_checkpoint(source: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and raw string metadata of a backbone file, without building a model."""
    return read_safetensors(source, "backbone")


def compare_checkpoints(a: str | os.PathLike, b: str | os.PathLike, *, atol: float = 0.0,
                        rtol: float = 0.0) -> list[str]:
    """Differences between two checkpoints: tensors and metadata values.

    An empty list means the files hold the same tensors and metadata. (Their bytes may still
    differ: safetensors writes metadata keys in no fixed order.) By default tensors must be equal
    bit for bit. With a tolerance, float tensors may differ by ``atol + rtol * |b|`` and the
    numbers of the training summary (losses) by ``rtol * |b|``, and the fingerprint (a hash of the
    tensors) is not compared: a checkpoint rebuilt on another kind of CPU rounds differently
    (its matrix kernels add in another order), so it matches to float rounding, not bit for bit.
    """
    if not (0 <= atol < float("inf") and 0 <= rtol < float("inf")):
        raise KgmlPeftError(f"tolerances must be finite and >= 0, got atol={atol}, rtol={rtol}")
    ta, ma = read_checkpoint(a)
    tb, mb = read_checkpoint(b)
    exact = atol == 0 and rtol == 0

    def same(x: torch.Tensor, y: torch.Tensor) -> bool:
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if exact or not x.dtype.is_floating_point:
            return torch.equal(x, y)
        return torch.allclose(x, y, rtol=rtol, atol=atol)

    diffs = [f"tensor {k} only in {a if k in ta else b}" for k in sorted(set(ta) ^ set(tb))]
    diffs += [f"tensor {k} differs" for k in sorted(set(ta) & set(tb)) if not same(ta[k], tb[k])]
    keys = set(ma) | set(mb)
    if not exact:
        keys.discard("fingerprint")  # a hash of the tensors: equal only when they are bit for bit
    for key in sorted(keys):
        if exact or key != "training":
            alike = ma.get(key) == mb.get(key)
        else:
            alike = _close_training(ma.get(key), mb.get(key), rtol)
        if not alike:
            diffs.append(f"metadata {key} differs")
    return diffs


def _close_training(a: str | None, b: str | None, rtol: float) -> bool:
    """Two training summaries (JSON text) alike, their numbers within ``rtol * |b|``; text that
    is not JSON must be equal."""
    try:
        return _close_json(json.loads(a or "null"), json.loads(b or "null"), rtol)
    except ValueError:
        return a == b


def _close_json(x: object, y: object, rtol: float) -> bool:
    """JSON values equal, numbers (not flags) within ``rtol * |y|``."""
    if _number(x) and _number(y):
        return abs(x - y) <= rtol * abs(y)
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_close_json(x[k], y[k], rtol) for k in x)
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(_close_json(u, v, rtol) for u, v in zip(x, y))
    return x == y and type(x) is type(y)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_training(training: object, source: Path) -> None:
    """The training summary is not fingerprinted (logs do not change predictions), so check the
    parts the toolkit reads back (``backbone show`` and its ``--plot``): an object whose
    ``phases`` are objects with a name, step and epoch counts and a best validation loss, whose
    ``data`` is an object and whose ``curves`` are points with a phase, step and losses."""
    def bad(what: str) -> KgmlPeftError:
        return KgmlPeftError(f"{source} has unreadable metadata (training {what})")

    if not isinstance(training, dict):
        raise bad("must be a JSON object")
    if not isinstance(training.get("phases", []), list):
        raise bad("phases must be a JSON list")
    for phase in training.get("phases", []):
        if not (isinstance(phase, dict) and isinstance(phase.get("name"), str)
                and all(_number(phase.get(k)) for k in ("steps", "best_epoch"))
                and (phase.get("best_val_loss") is None or _number(phase.get("best_val_loss")))):
            raise bad("phases must be objects with name, steps, best_epoch and best_val_loss")
    if not isinstance(training.get("data", {}), dict):
        raise bad("data must be a JSON object")
    if not isinstance(training.get("curves", []), list):
        raise bad("curves must be a JSON list")
    for point in training.get("curves", []):
        if not (isinstance(point, dict) and isinstance(point.get("phase"), str) and _number(point.get("step"))
                and all(point.get(k) is None or _number(point.get(k)) for k in ("train_loss", "val_loss"))):
            raise bad("curves must be objects with phase, step, train_loss and val_loss")


def load_backbone(path: str | os.PathLike, device: str | torch.device = "cpu") -> Backbone:
    """Load and verify a backbone checkpoint (format, shapes, finite values, fingerprint)."""
    source = Path(path)
    tensors, metadata = read_checkpoint(source)
    if metadata.get("format") != FORMAT:
        raise KgmlPeftError(
            f"{source} is not a kgml-peft backbone (format {metadata.get('format')!r})"
        )
    if metadata.get("format_version") != FORMAT_VERSION:
        raise KgmlPeftError(
            f"{source} has backbone format version {metadata.get('format_version')!r}; "
            f"this toolkit reads version {FORMAT_VERSION}"
        )
    try:
        config = BackboneConfig.from_dict(json.loads(metadata["config"]))
        scalers = Scalers.from_dict(json.loads(metadata["scalers"]))
        training = json.loads(metadata.get("training", "{}"))
    # RecursionError: JSON nested thousands of levels deep
    except (KeyError, TypeError, ValueError, AttributeError, json.JSONDecodeError, RecursionError) as exc:
        raise KgmlPeftError(f"{source} has unreadable metadata ({exc})") from None
    _check_training(training, source)
    scalers.require([*config.features, *schema.TARGETS], source=str(source))
    # Shapes from a model on the meta device: no memory is allocated, so a config that names a
    # huge hidden size is refused below instead of allocating it.
    try:
        with torch.device("meta"):
            expected = KGMLag(config).state_dict()
    except (RuntimeError, TypeError, ValueError, OverflowError) as exc:  # sizes beyond int64
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise KgmlPeftError(f"{source} has unreadable metadata (config: {first})") from None
    if set(tensors) != set(expected):
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise KgmlPeftError(f"{source} does not match its config: {what}")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise KgmlPeftError(
                f"{source}: tensor {name} has shape {list(tensor.shape)}, "
                f"the config needs {list(expected[name].shape)}"
            )
        if tensor.dtype != torch.float32:
            raise KgmlPeftError(f"{source}: tensor {name} is {tensor.dtype}, expected float32")
        if not torch.isfinite(tensor).all():
            raise KgmlPeftError(f"{source}: tensor {name} contains NaN or inf")
    fp = fingerprint(tensors, config, scalers)
    if metadata.get("fingerprint") != fp:
        raise KgmlPeftError(
            f"{source}: fingerprint mismatch (stored {metadata.get('fingerprint', '')[:16]}, "
            f"computed {fp[:16]}); the file was modified or is corrupt"
        )
    model = KGMLag(config)
    model.load_state_dict(tensors)
    model.to(device).eval()
    return Backbone(model=model, config=config, scalers=scalers, fingerprint=fp,
                    training=training, path=source)
