"""The site model: a frozen backbone plus one site adapter phi_s.

* **LoRA** on GRU weight matrices, injected by peft (``LoraConfig(target_parameters=[...])``): the
  GRU runs with ``W + alpha / r * B A``; B starts at zero.
* **Bottleneck blocks** after GRU output sequences: ``h + up(gelu(down(h)))``, ``up`` starts at
  zero.
* **Calibration head** on the outputs (scaled units): ``y * (1 + scale) + shift`` per output,
  optionally plus a residual MLP of the input features on Ra, Rh and NEE (last layer zero).

Every component starts as an exact identity, so a fresh adapter reproduces the backbone's
predictions bit for bit. The adapter's tensors have stable, component-namespaced names
(``lora.gru_rh.weight_hh_l0.A``, ``blocks.gru_nee.down.weight``, ``head.scale``; weights unfrozen
with ``unfreeze`` as ``backbone.<name>``), independent of how peft nests its wrappers.
"""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from torch.nn import functional as F

from kgml_peft import schema
from kgml_peft.tuners.config import AdapterConfig
from kgml_peft.errors import KgmlPeftError
from kgml_peft.model.backbone import KGMLag

#: The outputs the head calibrates, in the order of its ``scale``/``shift`` entries.
HEAD_OUTPUTS: tuple[str, ...] = (*schema.FLUX_OUTPUTS, "Yield")


def bottleneck(h: torch.Tensor, down_weight: torch.Tensor, down_bias: torch.Tensor,
               up_weight: torch.Tensor, up_bias: torch.Tensor) -> torch.Tensor:
    """``h + up(gelu(down(h)))`` from plain tensors (training and serving share this)."""
    return h + F.linear(F.gelu(F.linear(h, down_weight, down_bias)), up_weight, up_bias)


def calibrate_outputs(out: dict[str, torch.Tensor], scale: torch.Tensor, shift: torch.Tensor,
                      residual: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """``(y + residual) * (1 + scale) + shift`` per head output. ``scale``/``shift`` are [4] for
    one site or [B, 4] per row; ``residual`` [B, T, 3] adds to Ra, Rh, NEE."""
    out = dict(out)
    per_row = scale.dim() == 2
    for j, name in enumerate(HEAD_OUTPUTS):
        value = out[name]
        if residual is not None and j < len(schema.FLUX_OUTPUTS):
            value = value + residual[..., j]
        s, b = (scale[:, j], shift[:, j]) if per_row else (scale[j], shift[j])
        if per_row and value.dim() == 2:  # daily outputs [B, T]
            s, b = s[:, None], b[:, None]
        out[name] = value * (1 + s) + b
    return out


class BottleneckBlock(nn.Module):
    """Residual bottleneck ``h + up(gelu(down(h)))``; ``up`` is zero, so it starts as identity."""

    def __init__(self, size: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(size, bottleneck)
        self.up = nn.Linear(bottleneck, size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return bottleneck(h, self.down.weight, self.down.bias, self.up.weight, self.up.bias)


class CalibrationHead(nn.Module):
    """Per-output scale and shift (zero = identity), optionally a residual feature MLP."""

    def __init__(self, n_features: int, kind: str = "affine", hidden: int = 8) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(len(HEAD_OUTPUTS)))
        self.shift = nn.Parameter(torch.zeros(len(HEAD_OUTPUTS)))
        self.mlp: nn.Sequential | None = None
        if kind == "mlp":
            self.mlp = nn.Sequential(nn.Linear(n_features, hidden), nn.Tanh(),
                                     nn.Linear(hidden, len(schema.FLUX_OUTPUTS)))
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)

    def forward(self, out: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Calibrated copy of the backbone's output dict (scaled units)."""
        residual = self.mlp(x) if self.mlp is not None else None
        return calibrate_outputs(out, self.scale, self.shift, residual)


class SiteModel(nn.Module):
    """A copy of ``backbone`` (frozen) with the adapter described by ``config`` attached.

    It takes and returns what :class:`~kgml_peft.model.backbone.KGMLag` does, so training,
    prediction and evaluation code runs on it unchanged. ``seed`` fixes the random initial values
    (LoRA A, block down-projections); the caller's backbone object is never modified.
    """

    def __init__(self, backbone: KGMLag, config: AdapterConfig, seed: int = 0) -> None:
        super().__init__()
        self.adapter_config = config
        self.config = backbone.config
        net = copy.deepcopy(backbone)
        net.requires_grad_(False)
        #: the backbone's own parameter names -> tensors (peft renames the GRU ones when it wraps)
        self._base = dict(net.named_parameters())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if "lora" in config.components:
                lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                                  target_modules=[], target_parameters=list(config.lora_parameters))
                net = inject_adapter_in_model(lora, net)
            self.backbone = net
            hidden = backbone.config.hidden_size
            self.blocks = nn.ModuleDict(
                {name: BottleneckBlock(hidden, config.bottleneck) for name in config.block_targets}
                if "blocks" in config.components else {}
            )
            self.head = (CalibrationHead(len(backbone.config.features), config.head, config.head_hidden)
                         if "head" in config.components else None)
        self._lora = self._lora_parameters()
        self._unfrozen: dict[str, torch.Tensor] = {}  # backbone name -> global value (mu anchor)

    def _lora_parameters(self) -> dict[str, nn.Parameter]:
        """Stable names for peft's LoRA factors: ``lora.<gru>.<weight>.A`` / ``.B``."""
        found: dict[str, nn.Parameter] = {}
        for path, module in self.backbone.named_modules():
            name = getattr(module, "parameter_name", None)
            if name is None or not hasattr(module, "lora_A"):
                continue
            key = f"lora.{path.split('.')[0]}.{name}"
            found[f"{key}.A"] = module.lora_A["default"].weight
            found[f"{key}.B"] = module.lora_B["default"].weight
        expected = {f"lora.{p}.{f}" for p in self.adapter_config.lora_parameters for f in "AB"}
        if "lora" in self.adapter_config.components and set(found) != expected:
            # peft versions before LoRA on nn.Parameter (or on RNN weights) silently skip targets
            missing = sorted(expected - set(found))
            raise KgmlPeftError(f"peft did not wrap {missing[0] if missing else 'the GRU weights'}; "
                                "LoRA on GRU weights needs peft >= 0.17 and torch >= 2.0")
        return found

    def forward(
        self, x: torch.Tensor, state: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Backbone forward with the blocks tapped in after their GRUs, then the head."""
        out = self.backbone(x, state, taps=self.blocks)
        return self.head(out, x) if self.head is not None else out

    def unfreeze(self, prefixes: tuple[str, ...]) -> list[str]:
        """Let backbone parameters whose name starts with one of ``prefixes`` train (anchored to
        their global values); return their names."""
        names = [n for n in self._base if any(n.startswith(p) for p in prefixes)]
        for prefix in prefixes:
            if not any(n.startswith(prefix) for n in names):
                raise KgmlPeftError(f"--unfreeze {prefix!r} matches no backbone parameter "
                                    f"(e.g. {', '.join(list(self._base)[:3])})")
        for name in names:
            self._base[name].requires_grad_(True)
            self._unfrozen[name] = self._base[name].detach().clone()
        return names

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """phi_s (LoRA, blocks, head) under the adapter file's names; excludes unfrozen weights."""
        params = dict(self._lora)
        for prefix, module in (("blocks", self.blocks), ("head", self.head)):
            if module is not None:
                params.update({f"{prefix}.{n}": p for n, p in module.named_parameters()})
        return params

    def anchored_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(trained, global) tensors of the unfrozen backbone weights, for the mu anchor."""
        return [(self._base[n], ref.to(self._base[n].device)) for n, ref in self._unfrozen.items()]

    def round_adapter(self, dtype: torch.dtype) -> None:
        """Round phi_s and unfrozen weights to ``dtype`` precision in place (they stay float32),
        so the model measured after training is exactly the one a file of that dtype stores."""
        with torch.no_grad():
            for param in [*self.adapter_parameters().values(), *(self._base[n] for n in self._unfrozen)]:
                param.copy_(param.to(dtype).to(param.dtype))

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor an adapter file stores: phi_s plus ``backbone.<name>`` unfrozen weights."""
        tensors = {k: v.detach().cpu().float().clone() for k, v in self.adapter_parameters().items()}
        tensors.update({f"backbone.{n}": self._base[n].detach().cpu().float().clone()
                        for n in self._unfrozen})
        return tensors

    def load_adapter_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set phi_s (and unfrozen weights) from an adapter file's tensors; names and shapes must
        match this model's adapter config exactly."""
        own = self.adapter_parameters()
        unfrozen = check_adapter_tensors(tensors, {k: tuple(v.shape) for k, v in own.items()},
                                         {k: tuple(v.shape) for k, v in self._base.items()})
        targets = {**own, **{f"backbone.{n}": self._base[n] for n in unfrozen}}
        for name in unfrozen:  # keep the global value first: it anchors any further training
            self._unfrozen.setdefault(name, self._base[name].detach().clone())
        with torch.no_grad():
            for name, tensor in tensors.items():
                targets[name].copy_(tensor.to(targets[name].dtype))


def check_adapter_tensors(tensors: dict[str, torch.Tensor], own: dict[str, tuple[int, ...]],
                          base: dict[str, tuple[int, ...]]) -> list[str]:
    """Raise unless ``tensors`` holds exactly the adapter tensors ``own`` (name -> shape) plus
    ``backbone.<name>`` copies of backbone parameters ``base`` (name -> shape), with those shapes;
    return the backbone parameter names it replaces."""
    unfrozen = sorted(k[len("backbone."):] for k in tensors if k.startswith("backbone."))
    unknown = [n for n in unfrozen if n not in base]
    if unknown:
        raise KgmlPeftError(f"adapter tensor backbone.{unknown[0]} names no backbone parameter")
    expected = {**own, **{f"backbone.{n}": base[n] for n in unfrozen}}
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        what = f"lacks {missing[0]}" if missing else f"has unexpected tensor {extra[0]}"
        raise KgmlPeftError(f"adapter {what} for its adapter config")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != expected[name]:
            raise KgmlPeftError(f"adapter tensor {name} has shape {list(tensor.shape)}, this "
                                f"backbone needs {list(expected[name])}")
    return unfrozen


def adapter_shapes(backbone: KGMLag, config: AdapterConfig) -> tuple[dict[str, tuple[int, ...]],
                                                                     dict[str, tuple[int, ...]]]:
    """(adapter tensor name -> shape, backbone parameter name -> shape) for ``config`` on
    ``backbone``, from a site model built on the meta device: a config naming a huge rank or
    bottleneck allocates nothing, and one too large to describe is refused."""
    try:
        with torch.device("meta"):
            own = SiteModel(backbone, config).adapter_parameters()
    except (RuntimeError, TypeError, ValueError, OverflowError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise KgmlPeftError(f"adapter config {config.to_dict()} does not fit the "
                            f"backbone ({first})") from None
    return ({k: tuple(v.shape) for k, v in own.items()},
            {k: tuple(v.shape) for k, v in backbone.named_parameters()})
