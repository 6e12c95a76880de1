"""The command line explains itself: `emajax --help` lists every verb with its summary and an example without
importing jax, every verb's (and sub-task's) --help ends with examples, and every example parses."""

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from emajax.cli import VERBS, build_parser, main, verb_help

REPO = Path(__file__).resolve().parents[1]


def test_top_level_help_lists_every_verb_without_importing_jax():
    code = ("import sys\nfrom emajax.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('JAX_IMPORTED' if 'jax' in sys.modules else 'JAX_NOT_IMPORTED')")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                         check=True).stdout
    assert out.rstrip().endswith("JAX_NOT_IMPORTED")
    for verb, mod in VERBS.items():
        summary, examples = verb_help(mod)
        assert summary and "\n" not in summary, f"emajax/cli/{mod}.py: SUMMARY must be one line"
        assert examples and all(e.split()[:2] == ["emajax", verb] for e in examples), \
            f"emajax/cli/{mod}.py: EXAMPLES must be command lines starting 'emajax {verb}'"
        assert f"  {verb} " in out and summary in out and f"e.g. {examples[0]}" in out


@pytest.mark.parametrize("verb", list(VERBS))
def test_every_verb_and_sub_task_help_has_examples(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:\n  emajax " + verb in out
    verb_parser = build_parser([verb])._subparsers._group_actions[0].choices[verb]
    for action in verb_parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for task, tp in action.choices.items():
                assert tp.epilog and f"emajax {verb} {task}" in tp.epilog, \
                    f"`emajax {verb} {task} --help` needs an example: add one to EXAMPLES in emajax/cli/{VERBS[verb]}.py"


@pytest.mark.parametrize("verb", list(VERBS))
def test_examples_parse(verb):
    for example in verb_help(VERBS[verb])[1]:
        argv = shlex.split(example)[1:]
        args = build_parser(argv).parse_args(argv)  # SystemExit (a failed test) on a stale example
        assert args.verb == verb
