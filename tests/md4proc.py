"""`python -m md4 ...` processes for the tests without paying for Python's imports each time.

A process that imports torch and md4 costs about 3 CPU-seconds before it does anything (torch,
md4, and torch._inductor, which torch.use_deterministic_algorithms imports); the tests that kill
and resume training start a dozen such processes. Here they are forked from one server process
(multiprocessing's "forkserver", started once per session) that has imported those modules and
has run nothing else, so no thread pool or process group is inherited. Each process is otherwise
what the command line starts: its own pid (SIGKILL kills it alone), md4's `__main__` run by runpy
with sys.argv, the exit status (SystemExit's code, -9 when killed), stdout and stderr (the file
descriptors, so the C libraries' output too), the environment and the working folder.

    proc = start(["train", "--config", "tiny", "--out", str(run)], env=env)
    out, err = proc.communicate(timeout=60)          # like subprocess.Popen(..., text=True)

`ranks(argv, 2, env)`: the processes of a job on one machine as torchrun starts them (RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for the gloo process group), without
torchrun's launcher.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import signal
import socket
import subprocess
import sys
import tempfile

# what `md4 train` imports on its way (the server imports them once; a fork shares them)
PRELOAD = ("md4.cli", "md4.commands", "md4.train", "md4.distributed", "md4.evaluate", "torch._inductor.config",
           "torch.distributed.fsdp", "torch.distributed.checkpoint.state_dict", "matplotlib.pyplot")


def _import_heavy() -> None:
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional part of torch: the child imports what it needs
            pass


if os.environ.get("MD4PROC_SERVER") == "1":  # imported by the fork server: preload
    _import_heavy()

_context = None


def context():
    """The forkserver context whose server has imported md4 and torch (started on first use)."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload([__name__])
        import md4

        # the server inherits the environment: it preloads on import, and finds this module and md4
        # (Python 3.11's server does not take the parent's sys.path)
        paths = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(md4.__file__))]
        server = {"MD4PROC_SERVER": "1", "PYTHONPATH": os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")])}
        saved = {k: os.environ.get(k) for k in server}
        os.environ.update(server)
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            for k, v in saved.items():
                if v is None:
                    del os.environ[k]
                else:
                    os.environ[k] = v
    return _context


def _child(argv: list[str], env: dict, cwd: str, out: str, err: str, script: str | None) -> None:
    """In the forked process: the command line's environment, folder, argv and file descriptors,
    then md4's __main__ or `script` (its SystemExit is the exit status)."""
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.argv = [script or "md4", *argv]
    if script:
        sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
        runpy.run_path(script, run_name="__main__")
    else:
        runpy.run_module("md4", run_name="__main__", alter_sys=True)


class Proc:
    """The parts of subprocess.Popen the tests use, for one forked `md4` process (text mode), or
    `python SCRIPT *argv` with `script`."""

    def __init__(self, argv: list[str], env: dict | None = None, cwd=None, script=None):
        self.args = [str(script or "md4"), *argv]
        fd_out, self._out = tempfile.mkstemp(prefix="md4proc-", suffix=".out")
        fd_err, self._err = tempfile.mkstemp(prefix="md4proc-", suffix=".err")
        os.close(fd_out)
        os.close(fd_err)
        env = dict(os.environ if env is None else env)
        env.pop("MD4PROC_SERVER", None)
        self._proc = context().Process(target=_child, args=(list(argv), env, str(cwd or os.getcwd()), self._out,
                                                            self._err, script and str(script)), daemon=False)
        self._proc.start()
        self.pid = self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.exitcode

    def poll(self) -> int | None:
        self._proc.join(0)
        return self._proc.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._proc.exitcode

    def send_signal(self, sig: int) -> None:
        if self._proc.exitcode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Wait for the end; (stdout, stderr). The process is killed if it outlives `timeout`."""
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.wait()
            raise
        finally:
            texts = []
            for path in (self._out, self._err):
                try:
                    with open(path, errors="replace") as f:
                        texts.append(f.read())
                    os.unlink(path)
                except FileNotFoundError:
                    texts.append("")
        return texts[0], texts[1]


def start(argv: list[str], env: dict | None = None, cwd=None, script=None) -> Proc:
    """`python -m md4 *argv` (or `python SCRIPT *argv`), forked from the server."""
    return Proc(argv, env, cwd, script)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ranks(argv: list[str], world: int, env: dict | None = None, script=None) -> list[Proc]:
    """`world` processes of one job on this machine with torchrun's variables for each rank."""
    env = dict(os.environ if env is None else env)
    port = str(free_port())
    return [start(argv, {**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
                         "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
                  script=script)
            for r in range(world)]


def logged_step(run) -> int:
    """The last step logged in run/metrics.jsonl so far (0 if none), from the file's last 4 KB (cheap
    enough to poll every millisecond); a half-written line is skipped."""
    try:
        with open(os.path.join(run, "metrics.jsonl"), "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            tail = f.read()
    except FileNotFoundError:
        return 0
    steps = [0]
    for line in tail.splitlines():
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            pass
    return max(steps)
