"""The KGML-ag backbone (CO2 version, Liu et al. 2024), built from a config.

Wiring (B = batch of site-years, T = 365 days, F = features, H = hidden size)::

    x [B,T,F] --gru_basis (2 layers)--> b [B,T,H]
    b --attention over days--> pooled [B,H] --MLP--> Yield [B]
    [b, x] --gru_ra (1 layer)--> Linear --> Ra [B,T]
    [b, x] --gru_rh (2 layers)--> Linear --> Rh [B,T]
    [Ra, Rh, x] --gru_nee (1 layer)--> Linear --> NEE [B,T]

All outputs are in the scaled (z-score) units of the backbone's scalers. The GRU modules keep the
names above because site adapters target their weights (``gru_ra.weight_ih_l0`` ...).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from kgml_peft import schema
from kgml_peft.config_files import check_keys
from kgml_peft.errors import KgmlPeftError, expect_type
from kgml_peft.model.recurrence import gru_layer, use_day_loop

#: Upper bound of a backbone's sizes: checked before any weight is allocated (a TOML asking for
#: 10^11 would otherwise try to allocate terabytes).
MAX_BACKBONE_SIZE = 4096

#: The recurrent modules, in the order they run, and their numbers of layers.
GRU_LAYERS: dict[str, int] = {"gru_basis": 2, "gru_ra": 1, "gru_rh": 2, "gru_nee": 1}
GRU_NAMES: tuple[str, ...] = tuple(GRU_LAYERS)

#: How to run GRUs that read the same input: ``(names, modules, inputs [B, T, in], h0s) ->
#: [(sequence, last state), ...]`` in the order of ``names`` (an ``h0`` of None starts at zero).
GruRunner = Callable[
    [Sequence[str], Sequence[nn.GRU], torch.Tensor, Sequence["torch.Tensor | None"]],
    list[tuple[torch.Tensor, torch.Tensor]],
]


def run_grus(names: Sequence[str], modules: Sequence[nn.GRU], inputs: torch.Tensor,
             h0s: Sequence[torch.Tensor | None]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The default :data:`GruRunner`: each module in turn."""
    return [module(inputs, h0) for module, h0 in zip(modules, h0s)]


#: One layer of a GRU: ``(layer index, its input sequence [B, T, in]) -> (sequence [B, T, H],
#: last state [B, H])``.
LayerStep = Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def run_layers(module: nn.GRU, seq: torch.Tensor, step: LayerStep, first: int = 0,
               states: Sequence[torch.Tensor] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Layers ``first`` .. of a stacked GRU, each by ``step``, with dropout between layers in
    training mode as torch's GRU: (last layer's sequence, last states [layers, B, H]). ``states``
    are the last states of the layers before ``first``, whose output ``seq`` is."""
    states = list(states)
    for layer in range(first, module.num_layers):
        if layer:
            seq = F.dropout(seq, module.dropout, module.training)
        seq, last = step(layer, seq)
        states.append(last)
    return seq, torch.stack(states)


class GRU(nn.GRU):
    """torch's GRU (same parameters, state dict and outputs) that runs the day loop of
    :func:`~kgml_peft.model.recurrence.gru_layer` where that is faster
    (:func:`~kgml_peft.model.recurrence.use_day_loop`). Weights are read as attributes, so LoRA
    that peft injects as a parametrization of them takes part, with its gradients."""

    def forward(self, input: torch.Tensor, hx: torch.Tensor | None = None  # noqa: A002 - nn.GRU's names
                ) -> tuple[torch.Tensor, torch.Tensor]:
        plain = (isinstance(input, torch.Tensor) and input.dim() == 3 and self.batch_first and self.bias
                 and not self.bidirectional and self.proj_size == 0 and input.shape[1] > 0)
        if not plain:
            return super().forward(input, hx)
        # weights read by name: a peft parametrization computes them from its (trainable) factors
        needs_grad = torch.is_grad_enabled() and (
            input.requires_grad or (hx is not None and hx.requires_grad)
            or any(getattr(self, name).requires_grad for name in self._flat_weights_names))
        if not use_day_loop(input.device, needs_grad, input.shape[0]):
            return super().forward(input, hx)

        def step(layer: int, seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            gi = F.linear(seq, getattr(self, f"weight_ih_l{layer}"), getattr(self, f"bias_ih_l{layer}"))
            h0 = seq.new_zeros(seq.shape[0], self.hidden_size) if hx is None else hx[layer]
            return gru_layer(gi, h0, getattr(self, f"weight_hh_l{layer}"), getattr(self, f"bias_hh_l{layer}"))

        return run_layers(self, input, step)


@dataclass(frozen=True)
class BackboneConfig:
    """Architecture of a KGML-ag backbone. The feature list fixes the input columns and order."""

    features: tuple[str, ...] = field(default=schema.DEFAULT_FEATURES)
    hidden_size: int = 32
    dropout: float = 0.1
    attention_size: int = 16
    yield_hidden: int = 32

    def __post_init__(self) -> None:
        expect_type(self.features, (list, tuple), "features")
        object.__setattr__(self, "features", schema.check_feature_names(self.features))
        for key in ("hidden_size", "attention_size", "yield_hidden"):
            expect_type(getattr(self, key), int, key)
        expect_type(self.dropout, (int, float), "dropout")
        if self.hidden_size < 1 or self.attention_size < 1 or self.yield_hidden < 1:
            raise KgmlPeftError("hidden_size, attention_size and yield_hidden must be positive")
        for key in ("hidden_size", "attention_size", "yield_hidden"):  # before a model is allocated
            if getattr(self, key) > MAX_BACKBONE_SIZE:
                raise KgmlPeftError(f"backbone {key} must be <= {MAX_BACKBONE_SIZE}, got {getattr(self, key)}")
        if not 0.0 <= self.dropout < 1.0:
            raise KgmlPeftError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        """JSON-ready form."""
        data = asdict(self)
        data["features"] = list(self.features)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> BackboneConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        check_keys(data, {"features", "hidden_size", "dropout", "attention_size", "yield_hidden"},
                   "backbone config")
        data = dict(data)
        if "features" in data:
            data["features"] = tuple(data["features"])
        return cls(**data)


class KGMLag(nn.Module):
    """KGML-ag: daily Ra, Rh, NEE and annual yield from daily inputs (see module docstring)."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.config = config
        f, h = len(config.features), config.hidden_size
        self.gru_basis = GRU(f, h, num_layers=GRU_LAYERS["gru_basis"], batch_first=True, dropout=config.dropout)
        self.drop = nn.Dropout(config.dropout)
        self.attn_score = nn.Sequential(
            nn.Linear(h, config.attention_size), nn.Tanh(), nn.Linear(config.attention_size, 1)
        )
        self.yield_head = nn.Sequential(
            nn.Linear(h, config.yield_hidden), nn.ReLU(), nn.Linear(config.yield_hidden, 1)
        )
        self.gru_ra = GRU(h + f, h, num_layers=GRU_LAYERS["gru_ra"], batch_first=True)
        self.ra_out = nn.Linear(h, 1)
        self.gru_rh = GRU(h + f, h, num_layers=GRU_LAYERS["gru_rh"], batch_first=True, dropout=config.dropout)
        self.rh_out = nn.Linear(h, 1)
        self.gru_nee = GRU(2 + f, h, num_layers=GRU_LAYERS["gru_nee"], batch_first=True)
        self.nee_out = nn.Linear(h, 1)

    def forward(
        self,
        x: torch.Tensor,
        state: dict[str, torch.Tensor] | None = None,
        taps: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
        runner: GruRunner = run_grus,
    ) -> dict[str, torch.Tensor]:
        """Run one year (or any number of days) of inputs ``x`` [B, T, F].

        ``state`` carries the GRU hidden states from the previous year of the same sites (the
        ``state`` entry of a previous call); ``None`` starts from zeros. ``taps`` maps GRU names
        (:data:`GRU_NAMES`) to functions applied to that GRU's output sequence [B, T, H] before it
        is used (site adapters insert their blocks here). ``runner`` runs the GRUs, those that read
        the same input together (serving runs per-row adapted weights here; see :data:`GruRunner`). Returns ``Ra``,
        ``Rh``, ``NEE`` [B, T], ``Yield`` [B] (scaled units) and ``state``.
        """
        if x.dim() != 3 or x.shape[-1] != len(self.config.features):
            raise KgmlPeftError(
                f"expected inputs of shape [batch, days, {len(self.config.features)}], "
                f"got {list(x.shape)}"
            )
        state = state or {}
        taps = taps or {}

        def run(*names: str, inputs: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
            results = runner(names, [getattr(self, n) for n in names], inputs,
                             [state.get(n) for n in names])
            # batch_first GRU outputs are strided views; a contiguous copy makes the Linear layers
            # after them take the same kernel whatever the weights' requires_grad (bit-exact
            # outputs for frozen and trainable copies of one backbone)
            return [((taps[n](seq.contiguous()) if n in taps else seq.contiguous()), last)
                    for n, (seq, last) in zip(names, results)]

        [(basis, h_basis)] = run("gru_basis", inputs=x)
        basis = self.drop(basis)
        weights = torch.softmax(self.attn_score(basis).squeeze(-1), dim=1)
        pooled = torch.einsum("bt,bth->bh", weights, basis)
        yield_ = self.yield_head(pooled).squeeze(-1)
        joint = torch.cat([basis, x], dim=-1)
        (h_ra_seq, h_ra), (h_rh_seq, h_rh) = run("gru_ra", "gru_rh", inputs=joint)
        ra = self.ra_out(h_ra_seq).squeeze(-1)
        rh = self.rh_out(self.drop(h_rh_seq)).squeeze(-1)
        nee_in = torch.cat([ra.unsqueeze(-1), rh.unsqueeze(-1), x], dim=-1)
        [(h_nee_seq, h_nee)] = run("gru_nee", inputs=nee_in)
        nee = self.nee_out(h_nee_seq).squeeze(-1)
        return {
            "Ra": ra,
            "Rh": rh,
            "NEE": nee,
            "Yield": yield_,
            "state": {"gru_basis": h_basis, "gru_ra": h_ra, "gru_rh": h_rh, "gru_nee": h_nee},
        }


def build_backbone(config: BackboneConfig, seed: int | None = None) -> KGMLag:
    """A freshly initialised backbone; ``seed`` makes the initial weights reproducible."""
    if seed is None:
        return KGMLag(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return KGMLag(config)
