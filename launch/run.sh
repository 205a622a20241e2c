#!/usr/bin/env bash
# One command from a fresh clone: set up (or reuse) ./.venv, then run the demo or the test suite.
#
#   bash launch/run.sh demo [OVERRIDE ...]   QLoRA + FSDP2 fine-tune of the offline tiny model, 2 CPU workers
#   bash launch/run.sh test [PYTEST ARG ...] the test suite
#
# FSDPQLORA_VENV chooses another environment directory.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FSDPQLORA_VENV:-$repo/.venv}"
python="${PYTHON:-python3}"

setup() {
    local stamp="$venv/.fsdpqlora-installed"
    local want
    want="$(cat "$repo/pyproject.toml" "$repo/launch/constraints-cpu.txt" | sha256sum | cut -d' ' -f1)"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return
    fi
    echo "[setup] installing into $venv (torch pinned to the CPU build; see README for GPUs)"
    [[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -c "$repo/launch/constraints-cpu.txt" torch
    "$venv/bin/python" -m pip install --quiet -c "$repo/launch/constraints-cpu.txt" -e "$repo[dev]"
    echo "$want" > "$stamp"
}

activation_hint() {
    # The commands live in the environment, not on PATH: say how to reach them.
    echo "[setup] the fsdpqlora command is in $venv/bin: run \`source $venv/bin/activate\` in your shell"
    echo "[setup]   (or add it to PATH: export PATH=\"$venv/bin:\$PATH\"), then: fsdpqlora --help"
}

command="${1:-}"
shift || true
case "$command" in
    demo)
        setup
        cd "$repo"
        # The tiny model learns fast; a real model would keep the default lr of 2e-4. fp32 on CPU
        # workers: bf16 matrix products are 10-20x slower on CPUs without native bf16.
        status=0
        "$venv/bin/fsdpqlora" precision=fp32 train.lr=2e-3 train.max_steps=120 train.log_every=10 "$@" || status=$?
        activation_hint
        exit "$status"
        ;;
    test)
        setup
        cd "$repo"
        # pytest exits 5 when it collects no test: with `set -e` that fails the run, as it must.
        exec "$venv/bin/python" -m pytest "$@"
        ;;
    *)
        echo "usage: bash launch/run.sh demo|test [ARGS ...]" >&2
        exit 2
        ;;
esac
