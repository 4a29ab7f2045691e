"""The tuners package: old adapter files still load and serve identically, and the package
layering holds (no import cycle anywhere, tuners below calibration, serve and store)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from kgml_peft.errors import KgmlPeftError
from kgml_peft.serve.bank import AdapterBank
from kgml_peft.serve.loading import apply_adapter
from kgml_peft.store.adapter import load_adapter, read_adapter
from kgml_peft.store.checkpoint import load_backbone

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "adapter_v1"
OUTPUTS = ("Ra", "Rh", "NEE", "Yield")


def _expected() -> tuple[dict[str, torch.Tensor], list[str | None]]:
    with safe_open(FIXTURES / "expected.safetensors", "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        rows = [None if n == "-" else n for n in handle.metadata()["rows"].split(",")]
    return tensors, rows


def test_adapter_files_of_the_previous_layout_serve_identically():
    """Adapter files written before the tuners package (commit 4c34371: one default adapter, one
    with LoRA on ih+hh of three GRUs, rank 2, blocks after gru_basis/gru_ra, an MLP head, an
    unfrozen weight, float16) give the predictions that code gave, through the site model and
    every bank strategy, to float32 rounding. The expected values were stored on the CPU that
    wrote them; on another kind of CPU torch's matrix kernels add in another order, so the
    comparison cannot be bit for bit (an AVX-512/AMX Xeon differs by up to 4.8e-7 at outputs up
    to 4.6, through every strategy alike). Since issue 22 the mixed pass (``batched``) runs the
    day loop of kgml_peft.model.recurrence, which also adds in its own order."""
    backbone = load_backbone(ROOT / "checkpoints" / "demo.safetensors")
    expected, rows = _expected()
    x = expected["x"]
    close = {"rtol": 0, "atol": 1e-6}
    with torch.no_grad():
        for site in ("IA-001", "IL-002"):
            adapter = load_adapter(FIXTURES / f"{site}.safetensors", backbone)
            out = apply_adapter(backbone, adapter)(x)
            for key in OUTPUTS:
                torch.testing.assert_close(out[key], expected[f"site_model.{site}.{key}"], **close)
        bank = AdapterBank(backbone, FIXTURES)
        for strategy in ("batched", "grouped", "naive"):
            out = bank.forward(x, bank.resolve(rows, require=False), strategy=strategy)
            for key in OUTPUTS:
                torch.testing.assert_close(out[key], expected[f"bank.{strategy}.{key}"], **close)
    # the files still read with the very names and config they were written with
    adapter = read_adapter(FIXTURES / "IL-002.safetensors")
    assert "head.mlp.2.weight" in adapter.tensors and "backbone.rh_out.weight" in adapter.tensors
    assert adapter.config.to_dict()["lora_weights"] == ["ih", "hh"] and "options" not in adapter.config.to_dict()


def _module_imports(path: Path, package: str) -> set[str]:
    """The kgml_peft modules ``path`` imports (top-level and inside functions)."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")
                parent = parts if path.name == "__init__.py" else parts[:-1]
                anchor = parent[: len(parent) - node.level + 1]
                target = ".".join(anchor + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith(package):
                found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith(package))
    return found


def test_no_package_imports_a_package_that_imports_it_back():
    """Walk every import in kgml_peft (also those inside functions) and fail on a cycle between
    packages or top-level modules: a lazy import that hides a cycle still counts."""
    pkg = ROOT / "kgml_peft"
    units = {p.name if p.is_dir() else p.stem for p in pkg.iterdir()
             if (p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py"}
    edges: dict[str, set[str]] = {}
    for path in pkg.rglob("*.py"):
        src = path.relative_to(pkg).parts[0].removesuffix(".py")
        for target in _module_imports(path, "kgml_peft"):
            parts = target.split(".")
            if len(parts) > 1 and parts[1] in units and parts[1] != src and src != "__init__":
                edges.setdefault(src, set()).add(parts[1])
    # depth-first search for a back edge
    colour: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        colour[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if colour.get(nxt) == 1:
                cycle = trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in colour:
                visit(nxt, trail + [nxt])
        colour[node] = 2

    for unit in sorted(edges):
        if unit not in colour:
            visit(unit, [unit])
    assert edges["tuners"] <= {"model", "errors", "config_files", "schema", "data"}, edges["tuners"]
    assert "calibration" not in edges["store"] and "serve" not in edges["calibration"]


def test_importing_tuners_loads_neither_calibration_nor_serve_nor_store():
    code = ("import sys, kgml_peft.tuners; "
            "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('kgml_peft.')}))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for package in ("calibration", "serve", "store", "train", "experiments"):
        assert f"'{package}'" not in loaded, loaded
    assert "'tuners'" in loaded and "'model'" in loaded


@pytest.mark.parametrize("config", [
    {},
    {"components": ("head",), "head": "mlp", "head_hidden": 3},
    {"lora_rank": 3, "lora_targets": ("gru_basis", "gru_nee"), "lora_weights": ("ih", "hh"),
     "block_targets": ("gru_basis", "gru_ra", "gru_rh", "gru_nee"), "bottleneck": 5},
])
def test_each_component_names_attaches_and_lays_out_the_same_tensors(backbone_path, config):
    """A component's shapes() (what files are checked against), attach() (what trains) and
    layout() (what serves) agree on every tensor: names, shapes, and none left unused."""
    from kgml_peft.tuners.base import active, adapter_shapes, namespaces
    from kgml_peft.tuners.config import AdapterConfig
    from kgml_peft.tuners.serving import ServingAdapter
    from kgml_peft.tuners.site_model import SiteModel

    backbone = load_backbone(backbone_path)
    cfg = AdapterConfig(**config)
    shapes = adapter_shapes(cfg, backbone.model)
    assert all(name.startswith(namespaces()) for name in shapes)
    trained = SiteModel(backbone.model, cfg).adapter_tensors()
    assert {k: tuple(v.shape) for k, v in trained.items()} == shapes
    served = ServingAdapter.from_tensors("x", trained, cfg)
    assert set(served.parts) == {c.name for c in active(cfg)}
    assert sum(t.numel() for t in served.tensors()) == sum(t.numel() for t in trained.values())
    with torch.device("meta"), pytest.raises(KgmlPeftError, match="choose a rank <= 8"):
        adapter_shapes(AdapterConfig(lora_rank=10**11), backbone.model)  # refused, never allocated
