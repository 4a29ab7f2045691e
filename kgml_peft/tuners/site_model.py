"""The site model: a frozen backbone plus one site adapter phi_s, for training and measuring it.

The adapter's components (:mod:`kgml_peft.tuners.base`) each attach their trainable tensors:
LoRA wraps the GRU weights with peft, the blocks and the head hold tensors of their own. Every
component starts as an exact identity, so a fresh adapter reproduces the backbone's predictions
bit for bit. The adapter's tensors keep their file names (``lora.gru_rh.weight_hh_l0.A``,
``blocks.gru_nee.down.weight``, ``head.scale``; weights unfrozen with :meth:`SiteModel.unfreeze`
as ``backbone.<name>``), independent of how peft nests its wrappers; the blocks' and head's
tensors are also registered under those names, so ``named_parameters`` shows them as files do.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from kgml_peft.errors import KgmlPeftError
from kgml_peft.model.backbone import KGMLag
from kgml_peft.tuners import base
from kgml_peft.tuners.config import AdapterConfig


def _register(root: nn.Module, name: str, param: nn.Parameter) -> None:
    """Register ``param`` on ``root`` under the dotted ``name``, making plain container modules
    for the path (``head.mlp.0.weight``: modules ``head``, ``mlp``, ``0``)."""
    *path, leaf = name.split(".")
    module = root
    for part in path:
        child = module._modules.get(part)
        if child is None:
            try:
                module.add_module(part, nn.Module())
            except KeyError as exc:  # the name is already an attribute of the model
                raise KgmlPeftError(f"adapter tensor {name} cannot be registered ({exc})") from None
            child = module._modules[part]
        module = child
    module.register_parameter(leaf, param)


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
        self._components = base.active(config)
        self._shapes = base.adapter_shapes(config, backbone)
        net = copy.deepcopy(backbone)
        net.requires_grad_(False)
        #: the backbone's own parameter names -> tensors (peft renames the GRU ones when it wraps)
        self._base = dict(net.named_parameters())
        params: dict[str, nn.Parameter] = {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for component in self._components:
                params.update(component.attach(config, net))
        self.backbone = net
        got = {k: tuple(v.shape) for k, v in params.items()}
        if got != self._shapes:
            wrong = sorted(set(got) ^ set(self._shapes)) or sorted(k for k in got if got[k] != self._shapes[k])
            raise KgmlPeftError(f"a component's attach() and shapes() disagree on {wrong[0]}")
        inside = {id(p) for p in net.parameters()}
        for name, param in params.items():
            if id(param) not in inside:  # tensors not already held by the (wrapped) backbone
                _register(self, name, param)
        #: phi_s under its file names, in component order
        self._params = params
        self._unfrozen: dict[str, torch.Tensor] = {}  # backbone name -> global value (mu anchor)

    def forward(
        self, x: torch.Tensor, state: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Backbone forward with every component's training part applied."""
        parts = [c.training_part(self.adapter_config, base.own_tensors(c, self._params))
                 for c in self._components]
        return base.run_parts(self.backbone, x, state, parts)

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
        """phi_s (every component's tensors) under the adapter file's names; excludes unfrozen
        weights."""
        return dict(self._params)

    def anchored_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(trained, global) tensors of the unfrozen backbone weights, for the mu anchor."""
        return [(self._base[n], ref.to(self._base[n].device)) for n, ref in self._unfrozen.items()]

    def round_adapter(self, dtype: torch.dtype) -> None:
        """Round phi_s and unfrozen weights to ``dtype`` precision in place (they stay float32),
        so the model measured after training is exactly the one a file of that dtype stores."""
        with torch.no_grad():
            for param in [*self._params.values(), *(self._base[n] for n in self._unfrozen)]:
                param.copy_(param.to(dtype).to(param.dtype))

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor an adapter file stores: phi_s plus ``backbone.<name>`` unfrozen weights."""
        tensors = {k: v.detach().cpu().float().clone() for k, v in self._params.items()}
        tensors.update({f"{base.BACKBONE_PREFIX}{n}": self._base[n].detach().cpu().float().clone()
                        for n in self._unfrozen})
        return tensors

    def load_adapter_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set phi_s (and unfrozen weights) from an adapter file's tensors; names and shapes must
        match this model's adapter config exactly."""
        unfrozen = base.check_named(tensors, self._shapes, {k: tuple(v.shape) for k, v in self._base.items()})
        targets = {**self._params, **{f"{base.BACKBONE_PREFIX}{n}": self._base[n] for n in unfrozen}}
        for name in unfrozen:  # keep the global value first: it anchors any further training
            self._unfrozen.setdefault(name, self._base[name].detach().clone())
        with torch.no_grad():
            for name, tensor in tensors.items():
                targets[name].copy_(tensor.to(targets[name].dtype))
