"""The README's commands work as written: every `fsdpqlora` command of its code blocks that runs
offline and in seconds (help, config, presets, plan, data previews, submit --dry-run, and the
refusals it shows) runs here, in-process, in a scratch directory holding the files it names; where
the README shows the output (`$ fsdpqlora ...` and the lines under it), the output must be that.
Commands that train, merge, generate or submit are left to the tests of those."""

from __future__ import annotations

import json
import re
import shlex

import pytest

from tests.helpers import REPO, run_launcher

QUICK = {"-h", "--help", "config", "presets", "plan", "data"}


def readme_commands() -> list[tuple[list[str], list[str] | None]]:
    """(arguments after `fsdpqlora`, the output lines the README shows or None) of every command line
    in a fenced block; a line ending in a backslash continues on the next."""
    commands, block, lines = [], None, (REPO / "README.md").read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if line.startswith("```"):
            block = None if block is not None else []
            continue
        if block is None:
            continue
        shown = line.startswith("$ fsdpqlora")
        if not (shown or line.startswith("fsdpqlora ")):
            continue
        while line.endswith("\\"):
            line = line[:-1] + lines[i].strip()
            i += 1
        output = None
        if shown:
            output = []
            while i < len(lines) and not lines[i].startswith(("```", "$ ")):
                output.append(lines[i])
                i += 1
        commands.append((shlex.split(line.removeprefix("$ "), comments=True)[1:], output))
    return commands


def runs_offline(args: list[str], output: list[str] | None) -> bool:
    if args[0] in QUICK or args[0] == "submit" and "--dry-run" in args:
        return True
    # a training command the README shows refused for its configuration alone (no data file read)
    return "=" in args[0] and output is not None and output[0].startswith("fsdpqlora: error:") and not any("path=" in a for a in args)


RUNNABLE = [(args, output) for args, output in readme_commands() if runs_offline(args, output)]


def test_the_readme_has_commands_to_run():
    kinds = {"submit" if args[0] == "submit" else args[0] if args[0] in QUICK else "refused" for args, _ in RUNNABLE}
    assert {"plan", "data", "submit", "refused"} <= kinds, kinds


@pytest.mark.parametrize("args, output", RUNNABLE, ids=[shlex.join(args)[:60] for args, _ in RUNNABLE])
def test_readme_command(args, output, tmp_path, model_dir):
    from fsdpqlora.assets import pydoc_qa_records

    records = [{k: r[k] for k in ("instruction", "input", "output")} for r in pydoc_qa_records()]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    # `data` with the tokenizer of the tests' model, not the tiny one built on first use (a minute);
    # HOME is the scratch directory, so what a command caches stays there.
    extra = ["model.name=test-llama", f"model.path={model_dir}"] if args[0] == "data" else []
    result = run_launcher(*args, *extra, cwd=tmp_path)
    if output is None:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        return
    printed = (result.stdout + result.stderr).splitlines()
    shown = [line for line in output if line.strip()]
    if any("..." in line for line in shown):  # an excerpt: each line shown begins a printed line
        for line in shown:
            start = re.escape(line.split("...")[0].rstrip())
            assert any(re.match(start, p) for p in printed), (line, printed)
    else:
        assert printed == shown
