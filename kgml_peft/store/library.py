"""The adapter store: a folder of ``<site>.safetensors`` files, and sharing files in and out.

Sharing needs nothing but the adapter file and the same backbone: ``export_adapter`` copies a
verified adapter out (with a short human-readable summary next to it), ``import_adapter`` checks a
received file against the local backbone and adds it to a store. Every write is atomic and an
existing file is only replaced when asked to (``force``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
import shutil
from pathlib import Path

from kgml_peft import schema
from kgml_peft.errors import KgmlPeftError
from kgml_peft.readable import check_regular_file
from kgml_peft.store.adapter import Adapter, check_compatible, read_adapter
from kgml_peft.atomic import atomic_path, check_outputs
from kgml_peft.store.checkpoint import Backbone, load_backbone
from kgml_peft.store.probe import check_adapter_outputs
from kgml_peft.text import printable
from kgml_peft.tuners.base import check_tensors

SUFFIX = ".safetensors"


def adapter_path(store: str | os.PathLike, site: str) -> Path:
    """``<store>/<site>.safetensors``; the site id must be safe as a file name."""
    return Path(store) / f"{schema.check_site_id(site, 'site')}{SUFFIX}"


def writable_target(path: Path, force: bool) -> Path:
    """Check that ``path`` can be written now, and that an existing file may be replaced
    (:func:`~kgml_peft.atomic.check_outputs` of one output)."""
    return check_outputs([path], force=force)[0]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def adapter_summary(adapter: Adapter) -> str:
    """A few human-readable lines: site, size, backbone, training data and validation metrics."""
    info, cfg = adapter.info, adapter.config
    calib, data, metrics = info.get("calibration") or {}, info.get("data") or {}, info.get("metrics") or {}
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    lines = [
        f"kgml-peft adapter for {info.get('scope', 'site')} {adapter.site} "
        f"({', '.join(info.get('sites') or [])})",
        f"backbone fingerprint {adapter.backbone_fingerprint}",
        f"components {', '.join(cfg.components)}; {adapter.parameters} parameters "
        f"({info.get('dtype', 'float32')}); LoRA rank {cfg.lora_rank} on {', '.join(cfg.lora_parameters)}",
    ]
    if adapter.blend is None:  # a blend was not trained: its sources are printed below
        lines += [
            f"trained with rho {calib.get('rho')}, mu {calib.get('mu')}, lambda {calib.get('physics_weight')}, "
            f"lr {calib.get('lr')}, seed {calib.get('seed')} on {data.get('train_site_years')} site-years "
            f"({data.get('first_date')} to {data.get('last_date')}, data hash {str(data.get('hash'))[:16]})",
            f"validation ({data.get('val_site_years')} site-years): loss {_fmt(before.get('loss'))} -> "
            f"{_fmt(after.get('loss'))}",
        ]
    for target, mse in (after.get("mse") or {}).items():
        lines.append(f"  {target} MSE {_fmt((before.get('mse') or {}).get(target))} -> {_fmt(mse)}")
    blend = adapter.blend
    if blend is not None:
        lines.append(f"blend ({blend.get('merge')}) for {blend.get('lat'):.5f}, {blend.get('lon'):.5f} of "
                     + ", ".join(f"{s.get('site')} ({s.get('distance_km'):.1f} km, weight {s.get('weight'):.3f})"
                                 for s in blend.get("sources") or []) + f"; kernel: {blend.get('kernel')}")
    location = adapter.location
    if location is not None:
        lines.append(f"location {location['lat']:.5f}, {location['lon']:.5f}"
                     + ("" if location["sites"] == 1 else
                        f" (centroid of {location['sites']} sites, within {location['extent_km']:.1f} km)"))
    cv = metrics.get("cv")
    if isinstance(cv, dict):  # a cross-validated adapter: the figures above are in-sample
        change = cv.get("change_mean")
        crops = cv.get("crops")
        lines.append(f"cross-validated on {len(cv.get('folds') or [])} folds: {cv.get('shape')} at strength "
                     f"{cv.get('strength')}, fold estimate of the change vs the global model "
                     f"{'-' if change is None else f'{100 * change:+.1f}%'}; the loss above is in-sample"
                     + ("" if crops is None else f"; applies to Crop_Type {', '.join(f'{c:g}' for c in crops)}"))
    if adapter.member_count > 1 or adapter.intervals is not None:
        lines.append(f"{adapter.member_count} member(s); "
                     + ("interval widths stored (predict --interval)" if adapter.intervals is not None
                        else "no interval widths"))
    versions = info.get("versions") or {}
    if versions:
        lines.append("made with " + ", ".join(f"{k.replace('_version', '')} {v}" for k, v in versions.items()))
    lines.append("use: kgml-peft adapters verify FILE --backbone <the backbone with this fingerprint>")
    return "\n".join(printable(line) for line in lines)  # metadata cannot start a line of its own


def list_adapters(store: str | os.PathLike) -> list[dict]:
    """One row per ``*.safetensors`` file of ``store`` (sorted by name). Site backbone checkpoints
    (``--method full|scratch``) are listed with ``kind`` ``backbone``; a file that cannot be read is
    listed with its ``error`` instead of failing the whole listing: so is an entry that is not a
    regular file (a FIFO, a folder, a broken link or a link loop; ``bytes`` ``None``), which is
    never opened."""
    folder = Path(store)
    if not folder.is_dir():
        raise KgmlPeftError(f"adapter store {folder} does not exist or is not a folder")
    rows = []
    for path in sorted(folder.glob(f"*{SUFFIX}")):
        row: dict = {"file": path.name, "bytes": None, "kind": "adapter"}
        try:
            row["bytes"] = check_regular_file(path, "adapter").st_size
            adapter = read_adapter(path)
        except KgmlPeftError as exc:
            if row["bytes"] is not None and _is_backbone(path):
                row.update(kind="backbone", site=path.stem)
            else:
                row.update(kind="unreadable", error=str(exc))
            rows.append(row)
            continue
        metrics = adapter.info.get("metrics") or {}
        place = adapter.location or adapter.blend  # where its data came from, or a blend's point
        row.update(
            site=adapter.site, scope=adapter.info.get("scope"), parameters=adapter.parameters,
            components=",".join(adapter.config.components),
            backbone=adapter.backbone_fingerprint[:16],
            val_loss_before=(metrics.get("before") or {}).get("loss"),
            val_loss_after=(metrics.get("after") or {}).get("loss"),
            nee_mse_before=((metrics.get("before") or {}).get("mse") or {}).get("NEE"),
            nee_mse_after=((metrics.get("after") or {}).get("mse") or {}).get("NEE"),
            lat=(place or {}).get("lat"), lon=(place or {}).get("lon"),
            extent_km=None if adapter.location is None else adapter.location["extent_km"],
            blend=None if adapter.blend is None else "+".join(s["site"] for s in adapter.blend["sources"]),
        )
        rows.append(row)
    return rows


def _is_backbone(path: Path) -> bool:
    try:
        load_backbone(path)
    except KgmlPeftError:
        return False
    return True


def check_fits(adapter: Adapter, backbone: Backbone) -> None:
    """Refuse an adapter that was not made for ``backbone`` (fingerprint, features) or whose
    tensor names and shapes do not fit its adapter config on that backbone. The content hash only
    proves the file is as its writer left it; a buggy writer can still store a config (a LoRA rank)
    that its tensors do not have."""
    check_compatible(adapter, backbone)
    check_tensors(adapter.tensors, adapter.config, backbone.model)


def check_usable(adapter: Adapter, backbone: Backbone) -> None:
    """Refuse an adapter that does not fit ``backbone`` (:func:`check_fits`) or whose predictions
    on it overflow on typical inputs (:mod:`kgml_peft.store.probe`): what ``adapters verify`` and
    ``import`` check."""
    check_fits(adapter, backbone)
    check_adapter_outputs(adapter, backbone)


def export_adapter(source: str | os.PathLike, destination: str | os.PathLike,
                   backbone: Backbone | None = None, force: bool = False,
                   inputs: Sequence[str | os.PathLike] = ()) -> tuple[Path, Path]:
    """Copy a verified adapter to ``destination`` (a file, or a folder for ``<site>.safetensors``:
    an existing folder, or a path ending in ``/``, created if missing) and write its summary to the
    same name with ``.txt``; return both paths. Neither may be ``source`` or one of ``inputs``
    (e.g. the backbone's file)."""
    adapter = read_adapter(source)
    if backbone is not None:
        check_usable(adapter, backbone)
    dest = Path(destination)
    if dest.is_dir() or str(destination).endswith(("/", os.sep)):
        dest = adapter_path(dest, adapter.site)
    elif not dest.suffix:
        raise KgmlPeftError(f"export target {dest} is neither a folder nor a {SUFFIX} file name "
                            f"(end a new folder's name with /)")
    if dest.suffix != SUFFIX:
        raise KgmlPeftError(f"export target {dest} must end in {SUFFIX}")
    summary = dest.with_suffix(".txt")
    check_outputs([dest, summary], [source, *inputs], force)
    text = adapter_summary(adapter) + "\n"  # before anything is written
    # the summary is renamed into place only once the adapter's copy is complete, and a failed
    # summary write removes the copy: no summary without its adapter, nor the other way round
    with atomic_path(dest) as tmp_adapter:
        shutil.copyfile(source, tmp_adapter)
        with atomic_path(summary) as tmp_summary:
            tmp_summary.write_text(text)
    return dest, summary


def import_adapter(source: str | os.PathLike, store: str | os.PathLike, backbone: Backbone,
                   force: bool = False, inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """Check a received adapter (integrity, made for ``backbone``, tensors that fit it) and copy
    it into ``store`` as ``<site>.safetensors``; return the new path. The copy may not replace
    one of ``inputs`` (e.g. the backbone's file)."""
    adapter = read_adapter(source)
    check_usable(adapter, backbone)
    folder = Path(store)
    if not folder.is_dir():
        raise KgmlPeftError(f"adapter store {folder} does not exist or is not a folder")
    dest = adapter_path(folder, adapter.site)
    if dest.exists() and dest.resolve() == Path(source).resolve():
        raise KgmlPeftError(f"{source} is already in the store {folder}")
    check_outputs([dest], [source, *inputs], force)
    with atomic_path(dest) as tmp:
        shutil.copyfile(source, tmp)
    return dest
