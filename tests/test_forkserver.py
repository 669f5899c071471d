"""embseg.forkserver: jobs forked from one server, with their output, exit codes and faults."""

import os
import subprocess
import textwrap

import pytest

from embseg.forkserver import ForkServer

JOBS = '''
import json, os, signal, sys, time

STARTED_IN = os.getpid()  # the server's pid: the module is preloaded there


def job(text):
    request = json.loads(text)
    if request["do"] == "echo":
        print(json.dumps({"text": request["text"], "pid": os.getpid(), "loaded_in": STARTED_IN,
                          "ppid": os.getppid(), "env": os.environ.get("FORKSERVER_TEST")}))
        print("to stderr", file=sys.stderr)
    elif request["do"] == "fail":
        raise ValueError("a job that fails")
    elif request["do"] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif request["do"] == "sleep":
        time.sleep(60)
'''


@pytest.fixture
def server(tmp_path):
    (tmp_path / "forkserver_jobs.py").write_text(textwrap.dedent(JOBS))
    env = {"PYTHONPATH": str(tmp_path), "FORKSERVER_TEST": "set"}
    with ForkServer("forkserver_jobs:job", preload=("json", "forkserver_jobs"), env=env) as srv:
        yield srv


def _echo(server, text):
    import json

    child = server.run(json.dumps({"do": "echo", "text": text}), timeout=60)
    assert child.returncode == 0, child.stderr
    assert child.stderr == "to stderr\n"
    return json.loads(child.stdout)


def test_each_job_is_a_child_of_the_server_with_its_output(server):
    first, second = _echo(server, "one"), _echo(server, "two")
    assert (first["text"], second["text"]) == ("one", "two")
    assert first["pid"] != second["pid"]  # a process per job
    # forked from the server that preloaded the module, with the server's environment
    assert first["ppid"] == first["loaded_in"] == second["loaded_in"] != os.getpid()
    assert first["env"] == "set"


def test_failures_and_kills_come_back_and_the_server_keeps_serving(server):
    failed = server.run('{"do": "fail"}', timeout=60)
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines()[-1] == "ValueError: a job that fails"
    assert server.run('{"do": "kill"}', timeout=60).returncode == -9
    assert _echo(server, "after")["text"] == "after"


def test_a_job_is_one_line_and_a_timeout_stops_the_server(server):
    with pytest.raises(ValueError, match="one line"):
        server.run('{"do": "echo",\n"text": "x"}')
    with pytest.raises(subprocess.TimeoutExpired):
        server.run('{"do": "sleep"}', timeout=1)
    assert server._proc.poll() is not None  # stopped, with its child
