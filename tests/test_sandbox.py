"""The sandbox of model-written code (README, Security): each escape of issue 17 and each reward hack,
through common.run_sandboxed and through both callers (reft_ppo.program_answer, score.reward)."""
import glob
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import tracemalloc
import uuid
from types import SimpleNamespace

import pytest

import common
import reft_ppo
import score

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox needs Linux namespaces")
TIMEOUT = 5.0  # P-CoT's prelude imports sympy: about a second on a busy CPU
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def direct(snippet):
    ok, out = common.run_sandboxed(snippet + "\nprint('reached')", timeout=TIMEOUT)
    return ok and out.endswith("reached\n")


def through_reft(snippet):
    """The snippet as the body of solution(): P-CoT reads 1.0 only if it ran to its end."""
    body = textwrap.indent(snippet, "    ")
    return reft_ppo.program_answer("def solution():", f"\n{body}\n    return 1.0\n", TIMEOUT) == 1.0


def through_score(snippet):
    """The snippet as an MBPP program whose one test always passes."""
    problem = score.Problem("", tests="assert True")
    return score.reward(problem, snippet, SimpleNamespace(program_timeout=TIMEOUT, no_sandbox=False)) == 1.0


RUNNERS = [direct, through_reft, through_score]


def alive(token):
    """Processes on this machine whose command line holds `token`."""
    found = []
    for name in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(name, "rb") as f:
                found += [name] if token.encode() in f.read() else []
        except OSError:  # it ended while we looked
            pass
    return found


def gone(token, seconds=3.0):
    """True once no process holds `token` (a SIGKILL lands within milliseconds)."""
    end = time.monotonic() + seconds
    while alive(token) and time.monotonic() < end:
        time.sleep(0.05)
    return not alive(token)


@pytest.mark.parametrize("runner", RUNNERS)
def test_honest_programs_still_pass(runner):
    assert runner("x = 6 * 7\nassert x == 42")


# ---------------------------------------------------------------- escapes: each snippet reaches its end only if
# the escape worked, and where the escape leaves a trace outside, the trace is checked too
@pytest.mark.parametrize("runner", RUNNERS)
def test_cannot_write_outside(runner, tmp_path, monkeypatch):
    target = tmp_path / "project.py"
    target.write_text("original\n")
    monkeypatch.chdir(tmp_path)  # the trainer's folder, as /proc/<parent>/cwd shows it today
    snippet = (f"import os\nfor path in [{str(target)!r}, '/proc/%d/cwd/planted.py' % os.getppid()]:\n"
               "    with open(path, 'a') as f:\n        f.write('pwned')")
    assert not runner(snippet)
    assert target.read_text() == "original\n" and not (tmp_path / "planted.py").exists()


@pytest.mark.parametrize("runner", RUNNERS)
def test_cannot_read_any_environment(runner):
    """The trainer's (/proc/<parent>/environ) and bwrap's own (/proc/1/environ in the PID namespace)."""
    assert os.environ.get("PATH")
    snippet = ("import glob\nseen = b''\nfor name in glob.glob('/proc/[0-9]*/environ'):\n    try:\n"
               "        seen += open(name, 'rb').read()\n    except OSError:\n        pass\n"
               "assert b'PATH=' in seen")
    assert not runner(snippet)


@pytest.mark.parametrize("runner", RUNNERS)
def test_no_network_not_even_loopback(runner):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        assert not runner(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).close()")
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected


@pytest.mark.parametrize("runner", RUNNERS)
def test_cannot_signal_the_trainer_or_kill_other_processes(runner):
    victim = subprocess.Popen(["sleep", "30"])
    try:
        assert not runner(f"import os\nos.kill({os.getpid()}, 0)\nos.kill({victim.pid}, 9)")
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.parametrize("runner", RUNNERS)
def test_no_process_outlives_the_run(runner):
    token = uuid.uuid4().hex
    snippet = ("import os, sys\nif os.fork() == 0:\n    os.setsid()\n"
               f"    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(20)', '{token}'])")
    try:
        assert not runner(snippet)
        assert gone(token, seconds=0.5)
    finally:
        for name in alive(token):  # today's code leaves it behind
            os.kill(int(name.split("/")[2]), signal.SIGKILL)


def test_every_process_dies_at_the_timeout_and_with_the_trainer():
    token = uuid.uuid4().hex
    start = time.monotonic()
    assert common.run_sandboxed(f"import time\ntime.sleep(30)  # {token}", timeout=0.5) == (False, "")
    assert time.monotonic() - start < 3 and gone(token)
    script = (f"import sys; sys.path.insert(0, {ROOT!r}); import common; "
              "common.run_sandboxed('import time; time.sleep(30)  # ' + sys.argv[1][::-1], timeout=30)")
    trainer = subprocess.Popen([sys.executable, "-c", script, token[::-1]])
    try:
        end = time.monotonic() + 30
        while not alive(token) and time.monotonic() < end:
            time.sleep(0.05)
        assert alive(token)  # the sandbox runs
    finally:
        trainer.kill()  # SIGKILL: the trainer cannot clean up
        trainer.wait()
    assert gone(token)


@pytest.mark.parametrize("runner", RUNNERS)
def test_process_count_is_limited(runner):
    snippet = ("import os, time\nfor _ in range(8):\n    if os.fork() == 0:\n        time.sleep(1)\n"
               "        os._exit(0)")
    assert not runner(snippet)


@pytest.mark.parametrize("runner", RUNNERS)
def test_memory_is_limited_for_the_whole_sandbox(runner):
    """Two processes mapping 600 MB each: each is under the 1024 MB default, together over it."""
    snippet = ("import mmap, os, time\npid = os.fork()\nblock = mmap.mmap(-1, 600 << 20)\nif pid == 0:\n"
               "    time.sleep(0.5)\n    os._exit(0)\nassert os.waitpid(pid, 0)[1] == 0")
    assert not runner(snippet)


def test_threads_share_one_memory_budget():
    snippet = ("import mmap, threading\nblocks = []\nthreads = [threading.Thread(target=lambda: "
               "blocks.append(mmap.mmap(-1, 200 << 20))) for _ in range(2)]\n"
               "[t.start() for t in threads]\n[t.join() for t in threads]\nassert len(blocks) == 2")
    assert common.run_sandboxed(snippet + "\nprint('ok')", timeout=TIMEOUT, memory_mb=300)[1] == ""
    assert common.run_sandboxed(snippet + "\nprint('ok')", timeout=TIMEOUT, memory_mb=800) == (True, "ok\n")


@pytest.mark.parametrize("runner", RUNNERS)
def test_output_flood_is_cut_and_fails(runner):
    assert not runner("import sys\nfor _ in range(40):\n    sys.stdout.write(('x' * 1023 + '\\n') * 1024)")


def test_output_is_read_up_to_the_cap_without_growing_the_trainer():
    tracemalloc.start()
    try:
        ok, out = common.run_sandboxed("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)",
                                       timeout=TIMEOUT)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not ok and 0 < len(out) <= 2 ** 20
    assert peak < 8 * 2 ** 20  # today: the whole flood in memory, several times over


@pytest.mark.parametrize("runner", RUNNERS)
def test_cannot_read_the_trainers_stdin(runner):
    read_end, write_end = os.pipe()
    os.write(write_end, b"stdin-secret\n")
    os.close(write_end)
    saved = os.dup(0)
    os.dup2(read_end, 0)
    try:
        assert not runner("import sys\nassert 'stdin-secret' in sys.stdin.read()")
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        os.close(read_end)


@pytest.mark.parametrize("runner", RUNNERS)
def test_a_sabotaged_temp_folder_never_raises_into_training(runner):
    """The program replaces its own working folder with a file: today's clean-up raises."""
    assert not runner("import os\nhere = os.getcwd()\nos.chdir('/')\nos.rmdir(here)\nopen(here, 'w').close()")


def test_a_fork_bomb_is_contained():
    assert not direct("import os\nos.fork()")  # the process limit holds: only then the bomb
    start = time.monotonic()
    ok, _ = common.run_sandboxed("import os\nwhile True:\n    try:\n        os.fork()\n"
                                 "    except OSError:\n        pass", timeout=1.0)
    assert not ok and time.monotonic() - start < 4


# ---------------------------------------------------------------- reward hacks: each scores 0
HACKS = {  # what the program does after its (wrong) work, so that the tests never run or never count
    "early exit": "import os\nos._exit(0)",
    "fake pass line": "import atexit, os\natexit.register(os._exit, 0)\natexit.register(print, 'all tests passed')",
    "kills its own harness": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
}


@pytest.mark.parametrize("hack", HACKS)
def test_score_code_reward_counts_only_a_finished_harness(hack):
    args = SimpleNamespace(program_timeout=TIMEOUT, no_sandbox=False)
    problem = score.Problem("", tests="assert add(2, 3) == 5")
    assert score.reward(problem, "def add(a, b):\n    return a + b", args) == 1.0
    assert score.reward(problem, "def add(a, b):\n    return a - b\n" + HACKS[hack], args) == 0.0


REFT_HACKS = {  # the program prints the gold answer itself, while solution() returns a wrong one
    "early exit": "print(42.0, flush=True)\nimport os\nos._exit(0)",
    "fake pass line": "import atexit\natexit.register(print, 42.0)",
    "kills its own harness": "print(42.0, flush=True)\nimport os, signal\nos.kill(os.getpid(), 9)",
}


@pytest.mark.parametrize("hack", REFT_HACKS)
def test_reft_reads_the_result_only_after_a_normal_exit(hack):
    body = textwrap.indent(REFT_HACKS[hack] + "\nreturn 41.0", "    ")
    assert reft_ppo.program_answer("def solution():", "\n" + body + "\n", TIMEOUT) is None
    assert reft_ppo.program_answer("def solution():", "\n    return 42.0\n", TIMEOUT) == 42.0


# ---------------------------------------------------------------- where bubblewrap is missing
@pytest.fixture
def no_bwrap(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no bwrap on the PATH
    common.sandbox_tool.cache_clear()
    yield
    common.sandbox_tool.cache_clear()


def test_without_bubblewrap_model_code_is_refused_unless_the_user_accepts_limits_alone(no_bwrap, tmp_path):
    with pytest.raises(SystemExit, match="bubblewrap.*--no_sandbox"):
        common.run_sandboxed("print(1)")
    with pytest.raises(SystemExit, match="--no_sandbox"):
        reft_ppo.main(["--cot", "program", "--task", "arith", "--model", "tiny", "--out_dir", str(tmp_path)])
    assert not (tmp_path / "metrics.jsonl").exists()  # stopped before any work
    assert common.run_sandboxed("print(1)", no_sandbox=True) == (True, "1\n")
    assert reft_ppo.program_answer("def solution():", "\n    return 42\n", TIMEOUT, no_sandbox=True) == 42.0
    args = SimpleNamespace(program_timeout=TIMEOUT, no_sandbox=True)
    assert score.reward(score.Problem("", tests="assert f() == 1"), "def f():\n    return 1", args) == 1.0
