"""``--threads`` on every command: a cap on torch's threads while the command runs."""

from __future__ import annotations

import argparse

import pytest
import torch

from interptool import cli
from interptool._resources import available_cpus

# a parsable similarity command line (the command itself is replaced in these tests)
ARGS = ["--out", "out", "teacher.h5", "student.h5"]


def _commands() -> list[str]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


@pytest.mark.parametrize("command", _commands())
def test_every_command_takes_threads(command):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert "--threads" in sub.choices[command]._option_string_actions


def test_threads_cap_torch_while_the_command_runs_and_are_restored(monkeypatch):
    """tests/conftest.py runs torch on 1 thread, which would make a cap of 1 pass unseen:
    start from 2, so only the cap can bring the command to 1, and only a restore back to 2."""
    before = torch.get_num_threads()
    seen = {}

    def fake_run(args):
        seen["threads"] = torch.get_num_threads()
        return 0

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub.choices["similarity"].set_defaults(func=fake_run)
    torch.set_num_threads(2)
    try:
        assert cli.main(["similarity", *ARGS, "--threads", "1"]) == 0
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert seen["threads"] == 1
    assert after == 2


def test_threads_never_exceed_the_cores_available(monkeypatch):
    seen = {}
    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub.choices["similarity"].set_defaults(
        func=lambda args: seen.setdefault("t", torch.get_num_threads()) and 0)
    cli.main(["similarity", *ARGS, "--threads", "64"])
    assert seen["t"] == min(64, available_cpus())


@pytest.mark.parametrize("bad", ["0", "-2"])
def test_bad_threads_is_a_one_line_error(bad, capsys):
    assert cli.main(["similarity", *ARGS, "--threads", bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--threads" in err[0] and ">= 1" in err[0]
