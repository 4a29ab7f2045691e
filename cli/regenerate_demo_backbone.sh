#!/usr/bin/env bash
# Regenerate the shipped demo backbone checkpoints/demo.safetensors from scratch:
# synthesize the demo data (process-model and observed flavours, seed 0), then run the staged
# KGML-ag pretraining with configs/demo.toml on CPU.
# Usage: cli/regenerate_demo_backbone.sh [OUT_DIR]   (default: checkpoints)
# Same kind of CPU + torch version -> the same tensors, bit for bit (check with: kgml-peft backbone compare A B);
# another kind of CPU rounds differently: compare with --atol 0.02 --rtol 1e-4 (docs/backbone.md).
set -euo pipefail
cd "$(dirname "$0")/.."
out_dir="${1:-checkpoints}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
kgml-peft synth --seed 0 --out "$work/demo.parquet"
kgml-peft synth --seed 0 --observed --out "$work/demo-observed.parquet"
kgml-peft pretrain --data "$work/demo.parquet" --observed "$work/demo-observed.parquet" \
    --config configs/demo.toml --name demo --out-dir "$out_dir" --cpu --quiet --force
