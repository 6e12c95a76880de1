"""bench.worker_json: the one way the benches run a worker process and read its JSON result line."""

from __future__ import annotations

import sys

import pytest

from bench import run_worker, worker_json


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_last_json_line_is_the_result():
    out = worker_json(_py("print('log'); print('{\"a\": 1}'); print('{\"a\": 2}'); print('done')"), 60)
    assert out == {"a": 2}


def test_env_reaches_the_worker():
    code = "import json, os; print(json.dumps({'v': os.environ.get('BENCH_WORKER_TEST')}))"
    assert worker_json(_py(code), 60, env={"BENCH_WORKER_TEST": "7"}) == {"v": "7"}


@pytest.mark.parametrize("code, expect", [
    ("import sys; print('{\"a\": 1}'); sys.stderr.write('boom\\n'); sys.exit(3)", "exit 3: boom"),
    ("print('no result here')", "exit 0: no result here"),
    ("pass", "exit 0: no JSON result line"),
])
def test_failures_come_back_as_errors(code, expect):
    assert worker_json(_py(code), 60) == {"error": expect}


def test_past_the_timeout_is_an_error():
    assert worker_json(_py("import time; time.sleep(30)"), 0.5) == {"error": "timed out after 0 s"}  # rounds to whole s


def test_run_worker_raises_with_the_worker_error():
    with pytest.raises(RuntimeError, match=r"worker json\.tool .* failed: exit 2: .*No such file"):
        run_worker("json.tool", ["/nonexistent/file.json"], timeout=60)
