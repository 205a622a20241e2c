"""What a run directory keeps of its console and its starts (fsdpqlora/logs.py): train.log holds rank
0's lines, those written before the run directory existed included, and command.txt gets one
entry per start, appended, never overwritten."""

from __future__ import annotations

import os
import shlex

from fsdpqlora.logs import configure_logging, kept_in, log, record_command


def test_train_log_keeps_the_lines_from_before_the_run_directory_and_nothing_after(tmp_path, capsys):
    configure_logging(0)
    log.info("[fsdpqlora] plan: before the run directory")
    with kept_in(tmp_path / "train.log"):
        log.info("step     1  loss 2.5000")
        log.warning("[fsdpqlora] warning: something")
    log.info("after the block")
    assert (tmp_path / "train.log").read_text() == (
        "[fsdpqlora] plan: before the run directory\nstep     1  loss 2.5000\n[fsdpqlora] warning: something\n"
    )
    assert "after the block" in capsys.readouterr().out  # the console still gets everything

    configure_logging(0)  # a second start appends, beginning with its own held lines only
    log.info("second start")
    with kept_in(tmp_path / "train.log"):
        pass
    assert (tmp_path / "train.log").read_text().splitlines()[-2:] == ["[fsdpqlora] warning: something", "second start"]


def test_other_ranks_keep_nothing(tmp_path):
    configure_logging(1)
    log.warning("rank 1 warning")
    try:
        with kept_in(tmp_path / "train.log"):
            pass
        assert (tmp_path / "train.log").read_text() == ""
    finally:
        configure_logging(0)


def test_command_txt_gets_one_entry_per_start(tmp_path):
    command = ["fsdpqlora", "model=tiny", 'data.prompt_template="Q: {q}"', "launch.run_dir=my run"]
    record_command(tmp_path, command, "the launcher: 2 workers per node, 1 node(s)")
    record_command(tmp_path, command, "the launcher: 2 workers per node, 1 node(s)")
    lines = (tmp_path / "command.txt").read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith("# ") and lines[0].endswith(", the launcher: 2 workers per node, 1 node(s)")
    cd, _, run = lines[1].partition(" && ")
    assert shlex.split(cd) == ["cd", os.getcwd()] and shlex.split(run) == command  # what a shell runs again
    assert lines[3] == lines[1]


def test_the_error_that_ends_a_run_is_in_its_log(tmp_path):
    from fsdpqlora.errors import TrainingDiverged

    configure_logging(0)
    try:
        with kept_in(tmp_path / "train.log"):
            raise TrainingDiverged("step 7: the loss (nan) is not finite")
    except TrainingDiverged:
        pass
    assert (tmp_path / "train.log").read_text() == "fsdpqlora: error: step 7: the loss (nan) is not finite\n"
