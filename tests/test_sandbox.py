"""The sandbox of model-written code (README, Security): each escape of issue 17 and each reward
hack, through common.run_sandboxed and through both callers (reft_ppo.program_answer and
score.reward)."""
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

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox needs Linux")
TIMEOUT = 5.0  # P-CoT's prelude imports sympy: about a second on a busy CPU
ARGS = SimpleNamespace(program_timeout=TIMEOUT, no_sandbox=False)  # score.reward's settings
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
    return score.reward(score.Problem("", tests="assert True"), snippet, ARGS) == 1.0


RUNNERS = [direct, through_reft, through_score]


def program(text):
    """A snippet written as an indented block (no blank lines: P-CoT stops at the first)."""
    return textwrap.dedent(text).strip("\n")


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


# ---------------------------------------------------------------- escapes: each snippet reaches
# its end only if the escape worked; a trace it would leave outside is checked too
@pytest.mark.parametrize("runner", RUNNERS)
def test_cannot_write_outside(runner, tmp_path, monkeypatch):
    target = tmp_path / "project.py"
    target.write_text("original\n")
    monkeypatch.chdir(tmp_path)  # the trainer's folder, as /proc/<parent>/cwd shows it today
    assert not runner(program(f"""
        import os
        for path in [{str(target)!r}, '/proc/%d/cwd/planted.py' % os.getppid()]:
            with open(path, 'a') as f:
                f.write('pwned')
        """))
    assert target.read_text() == "original\n" and not (tmp_path / "planted.py").exists()


def test_only_a_small_private_tmp_is_writable():
    """Files are memory too: the root and /dev are read-only tmpfs, /tmp holds 16 MB."""
    name = uuid.uuid4().hex
    paths = ["/" + name, "/dev/shm/" + name]
    try:
        for path in paths:
            assert not direct(f"open({path!r}, 'w').write('x')")
        assert direct(f"open('/tmp/{name}', 'w').write('x')")
        assert not direct("for i in range(24):\n    open(f'/tmp/{i}', 'wb').write(bytes(2 ** 20))")
    finally:
        for path in paths:  # today's code writes them on the host
            if os.path.exists(path):
                os.remove(path)


@pytest.mark.parametrize("runner", RUNNERS)
def test_cannot_read_any_environment(runner):
    """The trainer's (/proc/<parent>/environ) and bwrap's own (/proc/1/environ inside)."""
    assert os.environ.get("PATH")
    assert not runner(program("""
        import glob
        seen = b''
        for name in glob.glob('/proc/[0-9]*/environ'):
            try:
                seen += open(name, 'rb').read()
            except OSError:
                pass
        assert b'PATH=' in seen
        """))


@pytest.mark.parametrize("runner", RUNNERS)
def test_no_network_not_even_loopback(runner):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        assert not runner(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), 2)")
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
    try:
        assert not runner(program(f"""
            import os, sys
            if os.fork() == 0:
                os.setsid()
                argv = ['python', '-c', 'import time; time.sleep(20)', '{token}']
                os.execv(sys.executable, argv)
            """))
        assert gone(token, seconds=0.5)
    finally:
        for name in alive(token):  # today's code leaves it behind
            os.kill(int(name.split("/")[2]), signal.SIGKILL)


def test_every_process_dies_at_the_timeout_and_with_the_trainer():
    token = uuid.uuid4().hex
    start = time.monotonic()
    sleeper = f"import time\ntime.sleep(30)  # {token}"
    assert common.run_sandboxed(sleeper, timeout=0.5) == (False, "")
    assert time.monotonic() - start < 3 and gone(token)
    script = (f"import sys; sys.path.insert(0, {ROOT!r}); import common; "
              "common.run_sandboxed(sys.argv[1][::-1], timeout=30)")
    # the trainer's command line holds the token reversed, only the sandbox's holds it as is
    trainer = subprocess.Popen([sys.executable, "-c", script, sleeper[::-1]])
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
    assert not runner(program("""
        import os, time
        for _ in range(8):
            if os.fork() == 0:
                time.sleep(1)
                os._exit(0)
        """))


@pytest.mark.parametrize("runner", RUNNERS)
def test_memory_is_limited_for_the_whole_sandbox(runner):
    """Two processes mapping 600 MB each: each is under the 1024 MB default, together over it."""
    assert not runner(program("""
        import mmap, os, time
        pid = os.fork()
        block = mmap.mmap(-1, 600 << 20)
        if pid == 0:
            time.sleep(0.5)
            os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        """))


def test_threads_share_one_memory_budget():
    threads = program("""
        import mmap, threading
        blocks = []
        def hold():
            blocks.append(mmap.mmap(-1, 200 << 20))
        threads = [threading.Thread(target=hold) for _ in range(2)]
        for thread in threads:
            thread.start()
            thread.join()
        assert len(blocks) == 2
        print('ok')
        """)
    assert common.run_sandboxed(threads, timeout=TIMEOUT, memory_mb=300)[1] == ""
    assert common.run_sandboxed(threads, timeout=TIMEOUT, memory_mb=800) == (True, "ok\n")


@pytest.mark.parametrize("runner", RUNNERS)
def test_output_flood_is_cut_and_fails(runner):
    assert not runner("import sys\nfor _ in range(40):\n    print(('x' * 1023 + '\\n') * 1023)")


def test_output_is_read_up_to_the_cap_without_growing_the_trainer():
    tracemalloc.start()
    try:
        flood = "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)"
        ok, out = common.run_sandboxed(flood, timeout=TIMEOUT)
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
    assert not runner(program("""
        import os
        here = os.getcwd()
        os.chdir('/')
        os.rmdir(here)
        open(here, 'w').close()
        """))


def test_a_fork_bomb_is_contained():
    assert not direct("import os\nos.fork()")  # the process limit holds: only then the bomb
    start = time.monotonic()
    ok, _ = common.run_sandboxed(program("""
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """), timeout=1.0)
    assert not ok and time.monotonic() - start < 4


# ---------------------------------------------------------------- reward hacks: each scores 0
HACKS = {  # what a wrong program does at its end, so that the tests never run or never count
    "early exit": "import os\nos._exit(0)",
    "fake pass line": ("import atexit, os\natexit.register(os._exit, 0)\n"
                       "atexit.register(print, 'all tests passed')"),
    "kills its own harness": "import os\nos.kill(os.getpid(), 9)",
}


@pytest.mark.parametrize("hack", HACKS)
def test_score_code_reward_counts_only_a_finished_harness(hack):
    problem = score.Problem("", tests="assert add(2, 3) == 5")
    assert score.reward(problem, "def add(a, b):\n    return a + b", ARGS) == 1.0
    assert score.reward(problem, "def add(a, b):\n    return a - b\n" + HACKS[hack], ARGS) == 0.0


REFT_HACKS = {  # the program prints the gold answer itself, while solution() returns a wrong one
    "early exit": "print(42.0, flush=True)\nimport os\nos._exit(0)",
    "fake pass line": "import atexit\natexit.register(print, 42.0)",
    "kills its own harness": "print(42.0, flush=True)\nimport os\nos.kill(os.getpid(), 9)",
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


def test_without_bubblewrap_model_code_is_refused_unless_limits_alone_are_accepted(no_bwrap,
                                                                                   tmp_path):
    with pytest.raises(SystemExit, match="bubblewrap.*--no_sandbox"):
        common.run_sandboxed("print(1)")
    with pytest.raises(SystemExit, match="--no_sandbox"):
        reft_ppo.main(["--cot", "program", "--task", "arith", "--out_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()  # stopped before any work
    assert common.run_sandboxed("print(1)", no_sandbox=True) == (True, "1\n")
    answer = reft_ppo.program_answer("def solution():", "\n    return 42\n", TIMEOUT, True)
    assert answer == 42.0
    unsandboxed = SimpleNamespace(program_timeout=TIMEOUT, no_sandbox=True)
    problem = score.Problem("", tests="assert f() == 1")
    assert score.reward(problem, "def f():\n    return 1", unsandboxed) == 1.0
