"""The listing helper `sync-tools check` forks at start (sync_tools.sources.lister): the same answers as
listing in-process, errors included; and whatever the helper fails to answer (killed, garbage, a URL
left out) is listed by the parent instead, never lost and never waited on past the timeouts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from sync_tools.cli import cli
from sync_tools.errors import DataError, RemoteError
from sync_tools.sources import lister
from sync_tools.sources.remote import RefCache
from tests.gitrepos import GitRepo
from tests.processes import assert_process_ends
from tests.servers.git_http import GitDaemon, free_port

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the helper is forked on Linux only")


@pytest.fixture
def served(tmp_path: Path):
    """Two upstreams over git:// and a workspace tracking them, plus a refused port and a bad scheme."""
    root = tmp_path / "up"
    for name, tags in (("a", ["v1.0.0", "v1.2.0"]), ("b", ["v2.0.0", "v2.1.0", "v3.0.0"])):
        repo = GitRepo.create(root / f"{name}.git")
        repo.commit("one")
        for t in tags:
            repo.tag(t, annotated=t.endswith(".0.0"))
            repo.commit(f"after {t}")
        repo.close()
    with GitDaemon(root) as daemon:
        ws = tmp_path / "ws"
        ws.mkdir()
        (ws / "sync-tools.yaml").write_text(yaml.safe_dump({"subsystems": {
            "a": {"upstream": f"{daemon.url}/a.git", "current": "v1.0.0"},
            "b": {"upstream": f"{daemon.url}/b.git", "current": "v2.0.0"},
            "b-again": {"upstream": f"{daemon.url}/b.git/", "current": "v2.1.0"},
            "refused": {"upstream": f"git://127.0.0.1:{free_port()}/x.git", "current": "v1.0.0"},
            "bad-scheme": {"upstream": "ftp://127.0.0.1/x.git", "current": "v1.0.0"},
        }}))
        yield ws, daemon


def run_process(ws: Path, *args: str, prelude: str = "") -> subprocess.CompletedProcess[str]:
    """`sync-tools ARGS` as the console script runs it (sync_tools.__main__), after *prelude*."""
    script = f"import sys\n{prelude}\nsys.argv = ['sync-tools', *{list(args)!r}]\n" \
             "from sync_tools.__main__ import main\nmain()\n"
    env = {k: v for k, v in os.environ.items() if k != "SYNC_TOOLS_CONFIG"}
    return subprocess.run([sys.executable, "-c", script], cwd=ws, env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_helper_answers_as_an_in_process_check_does(served):
    ws, _ = served
    p = run_process(ws, "check", "--json", "--timeout", "10")
    inproc = CliRunner().invoke(cli, ["check", "--json", "--timeout", "10", "--config", str(ws / "sync-tools.yaml")])
    assert p.returncode == inproc.exit_code == 1  # the refused port and the bad scheme fail
    got, want = json.loads(p.stdout), json.loads(inproc.stdout)
    assert got == want
    assert got["a"]["latest"] == "v1.2.0" and got["b"]["latest"] == "v2.1.0"
    assert got["b"]["major_available"] == "v3.0.0" and got["b-again"]["update_available"] is False
    assert "cannot reach" in got["refused"]["error"] and "unsupported scheme" in got["bad-scheme"]["error"]


def test_the_helper_is_used_and_the_parent_never_imports_dulwich_for_it(served):
    ws, _ = served
    spy = ("import sync_tools.sources.remote as remote\n"
           "real = remote.RefCache._fill_from\n"
           "def fill_from(self, helper, claimed):\n"
           "    print('helper asked for', len(claimed), file=sys.stderr)\n"
           "    real(self, helper, claimed)\n"
           "remote.RefCache._fill_from = fill_from\n"
           "import atexit\n"
           "atexit.register(lambda: print('parent imported dulwich.client:', 'dulwich.client' in sys.modules,"
           " file=sys.stderr))\n")
    p = run_process(ws, "check", "a", "b", "--json", prelude=spy)
    assert p.returncode == 0, p.stderr
    assert "helper asked for 2" in p.stderr
    assert "parent imported dulwich.client: False" in p.stderr
    assert json.loads(p.stdout)["a"]["latest"] == "v1.2.0"


def test_a_killed_helper_is_listed_around(served):
    """The helper dies before it answers: the parent lists every remote itself, with the same answers."""
    ws, _ = served
    kill = ("from sync_tools.sources import lister\n"
            "import os, signal\n"
            "real_start = lister.start\n"
            "def start():\n"
            "    helper = real_start()\n"
            "    os.kill(helper.pid, signal.SIGKILL)\n"
            "    os.waitpid(helper.pid, 0)\n"
            "    return helper\n"
            "lister.start = start\n")
    p = run_process(ws, "check", "--json", prelude=kill)
    assert p.returncode == 1
    got = json.loads(p.stdout)
    assert got["a"]["latest"] == "v1.2.0" and got["b"]["latest"] == "v2.1.0"
    assert "cannot reach" in got["refused"]["error"]


class FakeHelper:
    """A helper that answers what it is told to (the parent's side only)."""

    def __init__(self, answers):
        self._answers = answers
        self.asked: list[str] = []

    def ask(self, urls, timeout):
        self.asked = list(urls)
        return True

    def answers(self):
        yield from self._answers

    def close(self):
        pass


def test_garbage_and_missing_answers_are_listed_by_the_parent(served):
    ws, daemon = served
    a, b = f"{daemon.url}/a.git", f"{daemon.url}/b.git"
    c, d = f"git://127.0.0.1:{free_port()}/gone.git", "ftp://127.0.0.1/x.git"
    helper = FakeHelper([
        (a, ("ok", "not a dict", {}, {})),      # garbage: listed again
        (c, ("RemoteError", f"{c}: the helper's words")),
        (d, ("DataError", f"{d}: the helper's words")),
        ("git://elsewhere/x.git", ("ok", {}, {}, {})),  # a URL nobody asked for: ignored
        (c, ("ok", {}, {}, {})),                 # a second answer for c: ignored
    ])  # and nothing for b
    cache = RefCache(timeout=10, helper=helper)
    cache.prefetch([a, b, c, d, a])
    assert helper.asked == [a, b, c, d]
    assert cache.get(a).tags()["v1.2.0"] and cache.get(b).tags()["v3.0.0"]
    with pytest.raises(RemoteError, match="the helper's words"):
        cache.get(c)
    with pytest.raises(DataError, match="the helper's words"):
        cache.get(d)
    assert cache.requests == 4


def test_a_helper_that_raises_midway_still_leaves_every_url_answered(served):
    _, daemon = served
    a = f"{daemon.url}/a.git"

    class Broken(FakeHelper):
        def answers(self):
            raise OSError("pipe went away")
            yield  # pragma: no cover

    cache = RefCache(timeout=10, helper=Broken([]))
    cache.prefetch([a])
    assert cache.get(a).tags()["v1.0.0"]


def test_the_real_helper_answers_each_remote_as_it_is_listed(served):
    """start() forks the helper from a fresh interpreter (as the console script does) and streams one
    framed answer per remote."""
    ws, daemon = served
    script = (
        "import json, sys\n"
        "from sync_tools.sources import lister\n"
        "helper = lister.start()\n"
        f"assert helper.ask([{daemon.url + '/a.git'!r}, 'ftp://127.0.0.1/x.git'], 10)\n"
        "print(json.dumps({url: [a[0], sorted(r for r in a[1] if r.startswith('refs/tags/')) if a[0] == 'ok'"
        " else a[1]] for url, a in helper.answers()}))\n"
    )
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert got[f"{daemon.url}/a.git"] == ["ok", ["refs/tags/v1.0.0", "refs/tags/v1.2.0"]]
    assert got["ftp://127.0.0.1/x.git"][0] == "DataError" and "unsupported scheme" in got["ftp://127.0.0.1/x.git"][1]


def test_a_helper_never_asked_exits_when_its_parent_does(tmp_path):
    """`sync-tools check` that fails before listing (a bad config) leaves no helper behind."""
    script = ("import sys\nfrom sync_tools.sources import lister\nh = lister.start()\nprint(h.pid)\n")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert_process_ends(int(p.stdout), "the helper outlived its parent")


@pytest.mark.parametrize(("argv", "wanted"), [
    (["check"], True), (["-v", "check", "--json"], True), (["-vv", "check", "nats"], True),
    (["--verbose", "check"], True), (["build", "--only", "check"], False), (["--help", "check"], False),
    (["--version"], False), ([], False), (["plan", "check"], False), (["-h"], False),
])
def test_wanted_is_the_check_command_only(argv, wanted):
    assert lister.wanted(argv) is wanted


def test_the_helper_holds_none_of_the_callers_pipes(tmp_path):
    """A caller capturing `sync-tools check`'s output reads to end of file: a helper still holding the
    stdout or stderr pipe would keep it waiting."""
    script = "import sys, time\nfrom sync_tools.sources import lister\nh = lister.start()\nprint(h.pid, flush=True)\n" \
             "time.sleep(3)\n"
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        assert proc.stdout is not None
        pid = int(proc.stdout.readline())
        deadline = time.monotonic() + 10
        seen: list[str] = []
        while time.monotonic() < deadline:
            try:
                seen = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in (0, 1, 2)]
            except FileNotFoundError:
                seen = []
            if seen == ["/dev/null"] * 3:
                break
            time.sleep(0.02)
        proc.kill()
    assert seen == ["/dev/null"] * 3
