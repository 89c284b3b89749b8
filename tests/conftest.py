import os
import sys
from pathlib import Path

import pytest

# No phoning home from the libraries under test.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

FLICKR8K = ROOT.parent / "shared" / "data" / "flickr8k"
TEST_PHOTOS = ROOT / "tests" / "data"  # photos the tests use that are not (or no longer) the app's examples


def subject_photos() -> dict:
    """name -> (path, spec) for every photo with written subject expectations: the app's examples
    (examples/subjects.json) and the photos kept for the tests (tests/data/subjects.json)."""
    import json

    out = {}
    for folder in (ROOT / "examples", TEST_PHOTOS):
        for name, spec in json.loads((folder / "subjects.json").read_text()).items():
            if not name.startswith("_"):
                out[name] = (folder / name, spec)
    return out


# The encoder's ONNX graphs (captioner.runtime) are cached in a temporary folder, for this process and the apps and
# CLIs it starts (tiny.app_env keeps CAPTIONER_CACHE): tests write only to temporary folders.
@pytest.fixture(scope="session", autouse=True)
def encoder_cache(tmp_path_factory):
    old = os.environ.get("CAPTIONER_CACHE")
    os.environ["CAPTIONER_CACHE"] = str(tmp_path_factory.mktemp("captioner-cache"))
    yield
    if old is None:
        os.environ.pop("CAPTIONER_CACHE", None)
    else:
        os.environ["CAPTIONER_CACHE"] = old


# One torch thread for the tests run in this process: their models are tiny, and with two threads every op waits for
# both, which on a busy 2-core machine made some tests ten times slower (the quick tier, -m "not slow", from well
# under 2 minutes to over 6). Subprocesses the tests start (the CLI, app.py, training runs) keep their own settings.
@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    torch = sys.modules.get("torch")  # imported by the test modules; a run that never imported it needs nothing
    if torch is None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# A tiny model trained to give each of a few distinct photos its own caption (tiny.distinct_model), for every test of
# order, batching or isolation; one per decoder, trained once per session (about a second each).
@pytest.fixture(scope="session")
def distinct():
    """(model, photos): a show-tell tiny model whose greedy captions differ per photo."""
    from tiny import distinct_model

    return distinct_model("show-tell")


@pytest.fixture(scope="session")
def distinct_attend():
    """(model, photos): the same for the attend decoder."""
    from tiny import distinct_model

    return distinct_model("attend")


@pytest.fixture(scope="session")
def distinct_dir(distinct, tmp_path_factory):
    """The distinct model saved to a folder, and its photos as PNG files beside it: (model folder, [photo paths])."""
    model, photos = distinct
    root = tmp_path_factory.mktemp("distinct")
    model.save_pretrained(root / "model")
    paths = []
    for i, img in enumerate(photos):
        img.save(root / f"photo{i}.png")
        paths.append(root / f"photo{i}.png")
    return root / "model", paths


# In CI (CI=true) every test must run: a test that skips there (Chromium or Playwright missing, Flickr8k not found,
# an optional package absent) fails the run instead of passing as an "s" in output nobody reads. A test whose skip
# is legitimate on some CI machine (another OS or C library) says so with @pytest.mark.may_skip.
def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and _in_ci() and item.get_closest_marker("may_skip") is None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in CI (CI=true), where every test must run: {reason}"

# Tests write only to temporary folders: a run that leaves the working tree different from how it found it (a new
# file that .gitignore does not cover, a tracked file changed) fails, naming the files. A no-op outside a git clone,
# or with CAPTIONER_ALLOW_WORKTREE_CHANGES=1 (for editing files while the tests run).
def _worktree_state():
    """{porcelain status line: (size, mtime_ns) of the file now} for every changed or untracked, not ignored path;
    None where git or the clone's .git is absent."""
    import shutil
    import subprocess

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "status", "--porcelain=v1", "-z", "--untracked-files=all"], cwd=ROOT,
                             capture_output=True, check=True, timeout=60).stdout.decode("utf-8", "replace")
    except (OSError, subprocess.SubprocessError):
        return None
    state, entries = {}, iter(out.split("\0"))
    for entry in entries:
        if not entry:
            continue
        if entry[0] in "RC":  # a rename or copy: the next field is the source path
            next(entries, None)
        path = ROOT / entry[3:]
        try:
            st = path.stat()
            state[entry] = (st.st_size, st.st_mtime_ns)
        except OSError:  # deleted
            state[entry] = None
    return state


def pytest_sessionstart(session):
    session.config._worktree_at_start = _worktree_state()


def pytest_sessionfinish(session, exitstatus):
    import pytest

    before = getattr(session.config, "_worktree_at_start", None)
    if before is None or os.environ.get("CAPTIONER_ALLOW_WORKTREE_CHANGES"):
        return
    after = _worktree_state()
    if after is None:
        return
    # What the run wrote: entries that are new, or whose file changed. (An entry that went away is a file committed or
    # restored meanwhile, by a person, not a test.)
    changed = sorted(e for e in after if before.get(e, "absent") != after[e])
    if not changed:
        return
    lines = ["The test run changed the working tree (tests must write only to temporary folders):"]
    lines += [f"  {e}" for e in changed]
    lines.append("  (files edited by hand while the tests ran show up here too: CAPTIONER_ALLOW_WORKTREE_CHANGES=1 "
                 "skips this check)")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write("\n")  # after the progress line, which pytest has not ended yet
    for line in lines:
        if reporter is not None:
            reporter.write_line(line, red=True, bold=line is lines[0])
        else:
            print(line)
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# The served app, one fixture for every test module of it (test_app_served, test_limits_served, test_attack_served,
# test_sturdiness): `model_dir` and `model` are a tiny random model whose <EOS> never wins, so every caption has the
# module's MAX_LEN words; `server` serves `served_model` (that model, unless the module overrides the fixture) in this
# process at the module's WORD_DELAY (0 where the module sets none: no pacing between streamed words).
@pytest.fixture(scope="module")
def model_dir(request, tmp_path_factory):
    from tiny import endless_model_dir

    return endless_model_dir(tmp_path_factory.mktemp("endless_model"), request.module.MAX_LEN)


@pytest.fixture(scope="module")
def model(model_dir):
    from captioner import Captioner

    return Captioner.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def app_process(model_dir):
    """app.py serving `model_dir` in a subprocess (1 thread, no word pacing) -> (process, URL): for RSS measurements."""
    from tiny import start_app

    proc, url = start_app(model_dir, "--threads", "1", "--word-delay", "0")
    yield proc, url
    proc.terminate()
    proc.communicate(timeout=30)


@pytest.fixture(scope="module")
def served_model(model):
    return model


@pytest.fixture(scope="module")
def server(request, served_model):
    """The app serving `served_model` on a free port of 127.0.0.1 -> its URL."""
    from tiny import serve_demo

    with serve_demo(served_model, f"tiny ({request.module.__name__})", word_delay=getattr(request.module, "WORD_DELAY", 0)) as url:
        yield url
