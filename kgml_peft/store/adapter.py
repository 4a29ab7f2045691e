"""Adapter files: one safetensors file per site, kilobytes in size. No pickle.

Tensors are namespaced by component (``lora.*``, ``blocks.*``, ``head.*``, and ``backbone.*`` for
backbone weights a run unfroze), float32 or float16. The ``__metadata__`` strings are listed in
:data:`METADATA_KEYS`; JSON-valued ones are JSON text. ``content_hash`` covers the adapter config
and every tensor, so a tampered or damaged file is caught even when it still parses;
``backbone_fingerprint`` ties the file to the one backbone it was trained on.

An adapter may hold several **members** (the fold adapters of a cross-validated calibration): the
first is stored under the names above and is what serves a point prediction; members 2..M are
stacked along a leading member axis as ``members.<name>`` (shape ``[M - 1, *shape]``). Their
spread and the conformal widths in ``metrics.intervals`` (:mod:`kgml_peft.uncertainty`) give
prediction intervals. A one-member file is exactly a file of earlier versions. The full byte
layout is documented in ``docs/adapter-format.md``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from kgml_peft import __version__, schema, uncertainty
from kgml_peft.tuners.base import namespaces
from kgml_peft.tuners.config import AdapterConfig
from kgml_peft.errors import KgmlPeftError
from kgml_peft.atomic import atomic_path
from kgml_peft.data.places import check_location
from kgml_peft.store.checkpoint import Backbone
from kgml_peft.store.hashing import content_hash, read_safetensors

FORMAT = "kgml-peft/adapter"
FORMAT_VERSION = "1"
#: The dtypes adapter tensors may be stored in (training is always float32).
STORAGE_DTYPES: tuple[str, ...] = ("float32", "float16")
#: Metadata keys whose values are JSON text.
JSON_KEYS: tuple[str, ...] = ("sites", "regions", "features", "targets", "adapter_config",
                              "calibration", "data", "metrics")
#: Every metadata key, in the order ``adapters show`` prints them.
METADATA_KEYS: tuple[str, ...] = (
    "format", "format_version", "site", "scope", "sites", "regions", "backbone_fingerprint",
    "features", "targets", "adapter_config", "calibration", "data", "metrics", "parameters",
    "dtype", "content_hash", "toolkit_version", "peft_version", "torch_version",
)
_DTYPES = {"float32": torch.float32, "float16": torch.float16}
#: tensor-name prefix of the stacked extra members
MEMBER_PREFIX = "members."
#: the ``scope`` of a blend of neighbours' adapters (:mod:`kgml_peft.store.blend`)
BLEND_SCOPE = "blend"
#: tensor name of a blend's member weights [M] (a tensor, so the content hash covers them)
MEMBER_WEIGHTS = "member_weights"


@dataclass
class Adapter:
    """A site adapter: its tensors (float32 in memory), architecture and provenance.

    ``info`` holds the JSON-decoded metadata: ``scope`` (``site`` or ``region``), ``sites``,
    ``regions``, ``features``, ``targets`` (loss weights), ``calibration`` (the run's config),
    ``data`` (summary and hash of the training table), ``metrics`` (validation before/after).
    """

    site: str
    config: AdapterConfig
    tensors: dict[str, torch.Tensor]
    backbone_fingerprint: str
    info: dict = field(default_factory=dict)
    path: Path | None = None
    #: members 2..M (each a full set of tensors named as ``tensors``); empty for one member
    members: list[dict[str, torch.Tensor]] = field(default_factory=list)
    #: a blend's weights, one per member (sum 1): its prediction is the weighted mean of its
    #: members'; None: member 1 is the prediction (the others give interval spreads)
    member_weights: tuple[float, ...] | None = None

    @property
    def parameters(self) -> int:
        """Number of stored values (every member)."""
        return sum(t.numel() for t in self.tensors.values()) + sum(
            t.numel() for m in self.members for t in m.values()) + len(self.member_weights or ())

    @property
    def member_count(self) -> int:
        """M: how many members the adapter holds (1 for a plain adapter)."""
        return 1 + len(self.members)

    @property
    def intervals(self) -> dict | None:
        """The conformal interval widths (``metrics.intervals``), or None if the file has none."""
        return (self.info.get("metrics") or {}).get("intervals")

    @property
    def blend(self) -> dict | None:
        """A blend's record (``metrics.blend``: point, merge, kernel, sources with distances and
        weights; see :mod:`kgml_peft.store.blend`), or None for a calibrated adapter."""
        if self.info.get("scope") != BLEND_SCOPE:
            return None
        return (self.info.get("metrics") or {}).get("blend")

    @property
    def location(self) -> dict | None:
        """Where the calibration data came from (``data.location``: lat, lon, sites, extent_km; see
        :func:`~kgml_peft.data.places.table_location`), or None if the file records none."""
        return (self.info.get("data") or {}).get("location")


def check_member_weights(weights: object, members: int, what: str) -> tuple[float, ...]:
    """A blend's member weights: one finite, non-negative number per member, summing to 1 (within
    float16 rounding); returned normalised to sum exactly to 1 in float64."""
    if not isinstance(weights, (list, tuple)) or len(weights) != members or any(
            isinstance(w, bool) or not isinstance(w, (int, float)) for w in weights):
        raise KgmlPeftError(f"{what}: the member weights must be {members} numbers, one per member")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or abs(sum(weights) - 1) > 1e-3:
        raise KgmlPeftError(f"{what}: the member weights must be non-negative and sum to 1")
    total = math.fsum(weights)
    return tuple(float(w) / total for w in weights)


def stack_members(tensors: dict[str, torch.Tensor], members: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``tensors`` plus members 2..M stacked along a leading axis under ``members.<name>``."""
    out = dict(tensors)
    for member in members:
        if set(member) != set(tensors) or any(member[k].shape != tensors[k].shape for k in tensors):
            raise KgmlPeftError("every adapter member must have the first member's tensor names and shapes")
    if members:
        for name, first in tensors.items():
            out[MEMBER_PREFIX + name] = torch.stack([m[name].to(first.dtype) for m in members])
    return out


def split_members(tensors: dict[str, torch.Tensor], source: object) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """The inverse of :func:`stack_members`, checked: the first member's tensors and the others."""
    first = {k: v for k, v in tensors.items() if not k.startswith(MEMBER_PREFIX)}
    stacked = {k[len(MEMBER_PREFIX):]: v for k, v in tensors.items() if k.startswith(MEMBER_PREFIX)}
    if not stacked:
        return first, []
    if set(stacked) != set(first):
        raise KgmlPeftError(f"{source}: the member tensors do not name the same tensors as the adapter")
    counts = {v.shape[0] if v.dim() else 0 for v in stacked.values()}
    bad = [k for k, v in stacked.items() if v.dim() == 0 or tuple(v.shape[1:]) != tuple(first[k].shape)]
    if bad or len(counts) != 1 or 0 in counts:
        raise KgmlPeftError(f"{source}: member tensor {MEMBER_PREFIX}{(bad or list(stacked))[0]} does not "
                            "stack members of the adapter's shapes")
    return first, [{k: v[m] for k, v in stacked.items()} for m in range(counts.pop())]


def _hash(site: str, config: AdapterConfig, fingerprint: str, features: list[str],
          tensors: dict[str, torch.Tensor]) -> str:
    """What decides an adapter's predictions and where it applies: site, architecture, backbone,
    features and tensors (the provenance fields are not hashed)."""
    header = {"site": site, "adapter_config": config.to_dict(), "backbone_fingerprint": fingerprint,
              "features": list(features)}
    return content_hash(header, tensors)


def _check_info(info: dict, parameters: str, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """The JSON metadata fields must have the types the toolkit writes (a foreign or hand-edited
    file is refused here, not by a crash later)."""
    def bad(key: str, what: str) -> KgmlPeftError:
        return KgmlPeftError(f"{source}: metadata field {key!r} must be {what}")

    for key in ("sites", "regions", "features"):
        value = info[key]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad(key, "a JSON list of strings")
    if not isinstance(info["targets"], dict) or not all(
            k in schema.TARGETS and isinstance(v, (int, float)) and not isinstance(v, bool)
            for k, v in info["targets"].items()):
        raise bad("targets", "a JSON object of target names and weights")
    for key in ("calibration", "data", "metrics"):
        if not isinstance(info[key], dict):
            raise bad(key, "a JSON object")
    if "location" in info["data"]:
        check_location(info["data"]["location"], f"{source}: metadata field data.location")
    _check_metrics(info["metrics"], source)
    if parameters != str(sum(t.numel() for t in tensors.values())):
        raise bad("parameters", f"the number of stored values ({sum(t.numel() for t in tensors.values())})")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _optional_number(value: object) -> bool:
    return value is None or _number(value)


#: ``metrics.cv`` fields that readers format as numbers (``adapters show``, ``calibrate`` reports)
CV_NUMBERS: tuple[str, ...] = ("strength", "epochs", "change_mean", "change_sd", "best_adapter_change_mean")


def _check_metrics(metrics: dict, source: Path) -> None:
    """The unhashed ``metrics`` must have the types the toolkit writes wherever a reader formats
    them (``adapters list``/``show``, ``predict``): ``before``/``after`` objects with a numeric
    ``loss`` and an object of numeric ``mse`` per target, and a ``cv`` object with numeric fields,
    a list of fold names and a list of crop codes. Checked once, when the file is read."""
    def bad(what: str) -> KgmlPeftError:
        return KgmlPeftError(f"{source}: metadata field 'metrics' {what}")

    for key in ("before", "after"):
        part = metrics.get(key, {})
        if not isinstance(part, dict) or not isinstance(part.get("mse", {}), dict):
            raise bad("must be a JSON object with before/after objects")
        if not _optional_number(part.get("loss")):
            raise bad(f"{key}.loss must be a finite number")
        if not all(isinstance(t, str) and _optional_number(v) for t, v in part.get("mse", {}).items()):
            raise bad(f"{key}.mse must map target names to finite numbers")
    cv = metrics.get("cv")
    if cv is None:
        return
    if not isinstance(cv, dict):
        raise bad("cv must be a JSON object")
    for key in CV_NUMBERS:
        if not _optional_number(cv.get(key)):
            raise bad(f"cv.{key} must be a finite number")
    folds = cv.get("folds", [])
    if not isinstance(folds, list) or not all(isinstance(f, str) for f in folds):
        raise bad("cv.folds must be a JSON list of fold names")
    if cv.get("shape") is not None and not isinstance(cv["shape"], str):
        raise bad("cv.shape must be a string")
    crops = cv.get("crops")
    if crops is not None and (not isinstance(crops, list) or not all(_number(c) for c in crops)):
        raise bad("cv.crops must be a JSON list of Crop_Type codes")


def _check_blend(record: object, members: int | None, source: Path) -> None:
    """A blend's ``metrics.blend`` record must have the fields and types the toolkit writes, and
    (function-space blends) one source per member."""
    def bad(what: str) -> KgmlPeftError:
        return KgmlPeftError(f"{source}: metrics.blend {what}")

    if not isinstance(record, dict):
        raise bad("must be an object (the file's scope is blend)")
    check_location({"lat": record.get("lat"), "lon": record.get("lon"), "sites": 1, "extent_km": 0.0},
                   f"{source}: metrics.blend")
    sources = record.get("sources")
    if not isinstance(sources, list) or not sources or not all(
            isinstance(s, dict) and isinstance(s.get("site"), str) and _number(s.get("distance_km"))
            and _number(s.get("weight")) for s in sources):
        raise bad("must list its sources, each with site, distance_km and weight")
    if members is not None and len(sources) != members:
        raise bad(f"lists {len(sources)} sources for {members} members")
    if not isinstance(record.get("merge"), str) or not isinstance(record.get("kernel"), str):
        raise bad("must name its merge and kernel")


def save_adapter(path: str | os.PathLike, adapter: Adapter, dtype: str = "float32") -> Path:
    """Write ``adapter`` atomically as a safetensors file (``dtype`` float32 or float16)."""
    schema.check_site_id(adapter.site, "adapter site")
    if dtype not in STORAGE_DTYPES:
        raise KgmlPeftError(f"adapter dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
    bad = [k for k in adapter.tensors if not k.startswith(namespaces())]
    if bad:
        raise KgmlPeftError(f"adapter tensor {bad[0]} is outside the namespaces {namespaces()}")
    intervals = adapter.intervals
    if intervals is not None:
        uncertainty.check_record(intervals, f"adapter {adapter.site}")
    stacked = stack_members(adapter.tensors, adapter.members)
    if adapter.member_weights is not None:
        stacked[MEMBER_WEIGHTS] = torch.tensor(check_member_weights(adapter.member_weights, adapter.member_count,
                                                                    f"adapter {adapter.site}"))
    tensors = {k: v.detach().cpu().to(_DTYPES[dtype]).contiguous() for k, v in sorted(stacked.items())}
    nonfinite = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if nonfinite:
        raise KgmlPeftError(f"adapter tensor {nonfinite[0]} is not finite in {dtype}")
    import peft

    info = adapter.info
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "site": adapter.site,
        "scope": info.get("scope", "site"),
        "backbone_fingerprint": adapter.backbone_fingerprint,
        "adapter_config": json.dumps(adapter.config.to_dict(), sort_keys=True),
        "parameters": str(sum(t.numel() for t in tensors.values())),
        "dtype": dtype,
        "content_hash": _hash(adapter.site, adapter.config, adapter.backbone_fingerprint,
                              info.get("features") or [], tensors),
        "toolkit_version": __version__,
        "peft_version": peft.__version__,
        "torch_version": torch.__version__.split("+")[0],
    }
    for key in JSON_KEYS:
        if key != "adapter_config":
            metadata[key] = json.dumps(info.get(key), sort_keys=True, separators=(",", ":"),
                                       allow_nan=False)
    target = Path(path)
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return target


def read_adapter(path: str | os.PathLike) -> Adapter:
    """Read and check an adapter file on its own: format, metadata, integrity, finite values.

    Use :func:`load_adapter` to also check it against a backbone.
    """
    source = Path(path)
    tensors, metadata = read_safetensors(source, "adapter")
    if metadata.get("format") != FORMAT:
        found = metadata.get("format")
        hint = " (it is a backbone checkpoint)" if found == "kgml-peft/backbone" else ""
        raise KgmlPeftError(f"{source} is not a kgml-peft adapter (format {found!r}){hint}")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise KgmlPeftError(f"{source} has adapter format version {metadata.get('format_version')!r}; "
                            f"this toolkit reads version {FORMAT_VERSION}")
    missing = [k for k in METADATA_KEYS if k not in metadata]
    if missing:
        raise KgmlPeftError(f"{source} lacks the metadata field {missing[0]!r}")
    try:
        info = {k: json.loads(metadata[k]) for k in JSON_KEYS}
        config = AdapterConfig.from_dict(info.pop("adapter_config"))
    # RecursionError: JSON nested thousands of levels deep
    except (TypeError, ValueError, json.JSONDecodeError, RecursionError, KgmlPeftError) as exc:
        raise KgmlPeftError(f"{source} has unreadable metadata ({exc})") from None
    site = metadata["site"]
    if not schema.SITE_ID_PATTERN.fullmatch(site):
        raise KgmlPeftError(f"{source} names an unsafe site {site!r}")
    dtype = metadata["dtype"]
    if dtype not in _DTYPES:
        raise KgmlPeftError(f"{source} declares dtype {dtype!r}; expected float32 or float16")
    for name, tensor in tensors.items():
        if name != MEMBER_WEIGHTS and not name.removeprefix(MEMBER_PREFIX).startswith(namespaces()):
            raise KgmlPeftError(f"{source}: tensor {name} is outside the adapter namespaces")
        if tensor.dtype != _DTYPES[dtype]:
            raise KgmlPeftError(f"{source}: tensor {name} is {tensor.dtype}, the file declares {dtype}")
        if not torch.isfinite(tensor).all():
            raise KgmlPeftError(f"{source}: tensor {name} contains NaN or inf")
    _check_info(info, metadata["parameters"], tensors, source)
    fingerprint = metadata["backbone_fingerprint"]
    if _hash(site, config, fingerprint, info["features"], tensors) != metadata["content_hash"]:
        raise KgmlPeftError(f"{source}: content hash mismatch; the file was modified or is corrupt")
    weights = tensors.get(MEMBER_WEIGHTS)
    first, members = split_members({k: v for k, v in tensors.items() if k != MEMBER_WEIGHTS}, source)
    if weights is not None:
        if weights.dim() != 1:
            raise KgmlPeftError(f"{source}: {MEMBER_WEIGHTS} must be one weight per member")
        weights = check_member_weights([float(w) for w in weights], 1 + len(members), str(source))
    if "intervals" in info["metrics"]:
        uncertainty.check_record(info["metrics"]["intervals"], str(source))
    if metadata["scope"] == BLEND_SCOPE:
        _check_blend(info["metrics"].get("blend"), 1 + len(members) if weights is not None else None, source)
    info.update(scope=metadata["scope"], dtype=dtype, parameters=int(metadata["parameters"]),
                content_hash=metadata["content_hash"],
                versions={k: metadata[k] for k in ("toolkit_version", "peft_version", "torch_version")})
    return Adapter(site=site, config=config, tensors={k: v.float() for k, v in first.items()},
                   backbone_fingerprint=fingerprint, info=info, path=source,
                   members=[{k: v.float() for k, v in m.items()} for m in members],
                   member_weights=weights)


def check_compatible(adapter: Adapter, backbone: Backbone) -> None:
    """Refuse an adapter made for another backbone (fingerprint or features differ)."""
    where = f"adapter {adapter.path}" if adapter.path else f"adapter {adapter.site}"
    if adapter.backbone_fingerprint != backbone.fingerprint:
        origin = f" {backbone.path}" if backbone.path else ""
        raise KgmlPeftError(
            f"{where} was trained on backbone {adapter.backbone_fingerprint[:16]}, not on "
            f"backbone{origin} {backbone.fingerprint[:16]}; use the backbone it was made for"
        )
    if tuple(adapter.info.get("features") or ()) != tuple(backbone.config.features):
        raise KgmlPeftError(f"{where} lists other features than backbone {backbone.fingerprint[:16]}")


def load_adapter(path: str | os.PathLike, backbone: Backbone | None = None) -> Adapter:
    """Read an adapter file (see :func:`read_adapter`) and, given a ``backbone``, check that it
    was made for exactly that backbone."""
    adapter = read_adapter(path)
    if backbone is not None:
        check_compatible(adapter, backbone)
    return adapter
