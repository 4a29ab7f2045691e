"""Reading safetensors files with one-line errors, and content hashes of tensors + JSON headers.

A content hash is a SHA-256 over the canonical JSON of a header (configs, scalers) and over every
tensor's name, dtype, shape and bytes, in name order: it changes exactly when something that
decides a model's predictions changes, and never with logs or metadata key order.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from kgml_peft.errors import KgmlPeftError
from kgml_peft.readable import check_regular_file


def canonical_json(data: object) -> bytes:
    """Compact JSON with sorted keys: the same data always gives the same bytes."""
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def content_hash(header: object, tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of ``header`` (JSON-ready) and ``tensors`` (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    digest.update(canonical_json(header))
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(canonical_json([name, str(tensor.dtype), list(tensor.shape)]))
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def read_safetensors(
    source: str | os.PathLike, what: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and raw string metadata of a safetensors file; ``what`` (``backbone``,
    ``adapter``) names the file in errors. Never unpickles anything."""
    path = Path(source)
    check_regular_file(path, what)  # a FIFO would block safe_open for ever
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise KgmlPeftError(f"{what} {path} is not a readable safetensors file ({first})") from None
    return tensors, metadata
