#!/usr/bin/env bash
# The demo: real adapterctl commands on an example checkpoint written by the format layer.
# No network: Hugging Face libraries are told to stay offline before anything imports them.
# What it makes stays in demo-out/ (ignored by git; replaced at each run), for the README's
# Quick start: `cd demo-out` and try the commands there.
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
export HF_HOME="$(mktemp -d)"
trap 'rm -rf "$HF_HOME"' EXIT
cd "$(dirname "$0")/.."
work=demo-out
rm -rf "$work"
mkdir "$work"

run() { printf '\n$ %s\n' "$*"; "$@"; }

python demo/make_example.py "$work/checkpoint"

run adapterctl --version
# a multi-adapter checkpoint: default at the root, math/ and code/ in subfolders
run adapterctl inspect "$work/checkpoint" --adapter math
# the code adapter has overlapping alpha_pattern keys: inspect says which one PEFT will use
run adapterctl inspect "$work/checkpoint" --adapter code --check
# JSON for scripts: per-module rank, alpha and scaling
printf '\n$ adapterctl inspect %s --json | (per-module scaling)\n' "$work/checkpoint"
adapterctl inspect "$work/checkpoint" --json | python demo/show_scaling.py
# pick the math adapter out and make it the root adapter of a new directory
run adapterctl select "$work/checkpoint" "$work/math-only" --adapter math --rename math=default
run ls -R "$work/math-only"
printf '\n$ adapterctl inspect %s --check --json > /dev/null\n' "$work/math-only"
adapterctl inspect "$work/math-only" --check --json > /dev/null && echo "(exit 0: no errors)"
# an existing output is never overwritten without --force
printf '\n$ adapterctl select ... (again, without --force)\n'
if adapterctl select "$work/checkpoint" "$work/math-only" --adapter math; then exit 1; fi
run adapterctl select "$work/checkpoint" "$work/math-only" --adapter math --adapter code --force --json
# a real (tiny, random) base model: load an adapter onto it, generate, merge
python demo/make_base.py "$work/base"
run adapterctl load "$work/base" "$work/checkpoint" --prompt "the tiny llama loads" --max-new-tokens 6 --compare-base
run adapterctl load "$work/base" "$work/math-only/math" --adapter-name math --merge-to "$work/merged" --json
run ls "$work/merged"
# the same merge from the files alone, one tensor at a time (no model built), checked in float64
run adapterctl merge "$work/base" "$work/math-only/math" "$work/merged-streamed" --verify
# create new adapters on that base, written as PEFT writes them
run adapterctl save "$work/base" "$work/my-adapter" --r 8 --alpha 16 --target q_proj,v_proj --task-type CAUSAL_LM --base-model demo/tiny-llama --seed 1
run adapterctl inspect "$work/my-adapter" --check
# the PiSSA story: create on the base, train on the residual base, convert to plain LoRA, use it
run adapterctl save "$work/base" "$work/pissa-init" --r 4 --target all-linear --init pissa --residual-out "$work/residual"
run python demo/train.py "$work/residual" "$work/pissa-init" "$work/pissa-trained"
run adapterctl convert "$work/pissa-trained" "$work/pissa-lora" --initial "$work/pissa-init" --verify
run adapterctl inspect "$work/pissa-lora" --check
# plain LoRA on the ORIGINAL base generates what was trained
run adapterctl load "$work/base" "$work/pissa-lora" --prompt "the tiny llama" --max-new-tokens 5 --compare-base
# lost the initial adapter? rebuild it from the original base (pissa's SVD is deterministic)
printf '\n$ adapterctl convert trained lora-from-base --base base --init pissa --verify --json | (verification)\n'
adapterctl convert "$work/pissa-trained" "$work/lora-from-base" --base "$work/base" --init pissa --verify --json \
  | python -c 'import json, sys; print(json.load(sys.stdin)["verification"])'
# smaller: the converted rank-8 adapter cut to rank 4 in bfloat16, with the error each module took
run adapterctl convert "$work/pissa-lora" "$work/pissa-lora-r4" --rank 4 --dtype bfloat16 --verify
# the wrong model class: the base checkpoint lacks weights the class needs, so nothing loads
printf "\n$ adapterctl load base checkpoint/code --model-class seq-cls\n"
if adapterctl load "$work/base" "$work/checkpoint/code" --model-class seq-cls; then exit 1; else echo "(exit $?)"; fi
# a damaged file: one clear error line, exit 1
head -c 100 "$work/checkpoint/adapter_model.safetensors" > "$work/broken.safetensors"
printf '\n$ adapterctl inspect broken.safetensors\n'
if adapterctl inspect "$work/broken.safetensors"; then exit 1; else echo "(exit $?)"; fi
rm "$work/broken.safetensors"
printf '\ndemo finished: its adapters are in demo-out/ (see the Quick start in README.md)\n'
