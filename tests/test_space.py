"""What a Hugging Face Space needs from this repository, checked offline: the README's front matter against the
Spaces configuration rules, LFS (none in this repository; what the git deploy moves to it), the split of the requirement files (the runtime file is
what a Space installs), and scripts/setup.sh's stamp, which keeps a set-up app from reinstalling or reaching the
network on every start."""
from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# https://huggingface.co/docs/hub/spaces-config-reference
REQUIRED_KEYS = {"title", "sdk", "sdk_version", "app_file"}
HUB_COLOURS = {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}
SHORT_DESCRIPTION_MAX = 60

# The .gitattributes a new Space (or model repo) starts with on the Hub.
HUB_LFS_PATTERNS = """*.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gz *.h5 *.joblib *.lfs.* *.mlmodel *.model *.msgpack *.npy
*.npz *.onnx *.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar *.safetensors saved_model/**/* *.tar.* *.tar *.tflite
*.tgz *.wasm *.xz *.zip *.zst *tfevents*""".split()
IMAGE_PATTERNS = ["*.png", "*.jpg", "*.jpeg", "*.webp", "*.gif"]
BINARY_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".h5", ".npy", ".npz", ".pkl", ".pickle",
                   ".msgpack", ".tflite", ".png", ".jpg", ".jpeg", ".webp", ".gif"}
LARGE = 1_000_000  # bytes: the Hub refuses plain git blobs over 10 MB; anything over 1 MB belongs in LFS anyway

# Imported by the package, but only on paths a Space never takes; they live in requirements-train.txt.
OPTIONAL_AT_RUNTIME = {
    "spacy": "captioner.vocab.tokenize: building a vocabulary and scoring (training); decoding never tokenizes",
    "timm": "captioner.model.Encoder, for backbones other than the built-in tf_efficientnet_lite0/1/2 (captioner.lite0)",
    # captioner.runtime: the encoder in ONNX Runtime for batches where installed; the app keeps PyTorch (issue 35)
    "onnxruntime": "captioner.runtime, where installed: the CLI on folders and evaluation; PyTorch otherwise",
    "onnx": "captioner.runtime: exporting the encoder's graph (with onnxruntime)",
}
NOT_RUNTIME = {"spacy", "timm", "torchvision", "tqdm"}  # the list: none belongs in a Space's requirements


# --- front matter ----------------------------------------------------------------------------------------------------

def front_matter() -> dict:
    text = README.read_text(encoding="utf-8")
    m = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert m, "README.md does not start with a --- YAML block --- (Hugging Face Spaces reads its settings there)"
    block = m.group(1)
    try:
        import yaml  # PyYAML: a dependency of gradio and huggingface_hub
    except ImportError:  # the block is flat `key: value` lines
        meta = {}
        for line in block.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                key, _, value = line.partition(":")
                value = value.strip()
                if value[:1] in "\"'" and value[-1:] == value[:1] and len(value) > 1:
                    value = value[1:-1]
                meta[key.strip()] = {"true": True, "false": False}.get(value, value)
        return meta
    meta = yaml.safe_load(block)
    assert isinstance(meta, dict), block
    return meta


def pins(name: str) -> dict[str, str]:
    """{normalized distribution name: version} of a requirements file's `name==version` lines (not its -r includes)."""
    out = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;]+)", line)
        assert m, f"{name}: {line!r} is not an exact pin (name==version)"
        out[normalize(m.group(1))] = m.group(2)
    return out


def normalize(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def is_one_emoji(s: str) -> bool:
    """One emoji: a single pictograph, possibly with a variation selector, skin tone or ZWJ-joined parts; or a flag."""
    bases, flags, joined = 0, 0, False
    for ch in s:
        cp = ord(ch)
        if ch == "\u200d":
            joined = True
        elif ch in "\ufe0e\ufe0f" or 0x1F3FB <= cp <= 0x1F3FF or 0xE0020 <= cp <= 0xE007F:
            continue  # variation selectors, skin tones, tag characters
        elif 0x1F1E6 <= cp <= 0x1F1FF:
            flags += 1  # regional indicators: two make a flag
        elif unicodedata.category(ch) == "So":
            bases += 0 if joined else 1
            joined = False
        else:
            return False
    return (bases, flags) in {(1, 0), (0, 2)}


def test_is_one_emoji():
    assert all(is_one_emoji(e) for e in ["📷", "🔥", "❤️", "👩‍💻", "👍🏽", "🇫🇷"])
    assert not any(is_one_emoji(e) for e in ["", "📷📷", "a", "📷 ", ":camera:", "🇫"])


def test_front_matter_follows_the_spaces_rules():
    meta = front_matter()
    assert REQUIRED_KEYS <= meta.keys(), f"missing: {sorted(REQUIRED_KEYS - meta.keys())}"
    assert meta["sdk"] == "gradio"
    gradio_pin = pins("requirements.txt").get("gradio")
    assert gradio_pin and str(meta["sdk_version"]) == gradio_pin, (meta["sdk_version"], gradio_pin)
    assert (ROOT / meta["app_file"]).is_file(), meta["app_file"]
    assert str(meta["title"]).strip() and len(str(meta["title"])) <= 30  # the Hub keeps titles short too

    description = meta.get("short_description", "")
    assert isinstance(description, str) and description.strip()
    assert len(description) <= SHORT_DESCRIPTION_MAX, f"{len(description)} characters: {description!r}"

    # A string: YAML would read an unquoted 3.10 as the number 3.1. The version the tests run on is the one to deploy.
    assert isinstance(meta.get("python_version"), str), meta.get("python_version")
    assert meta["python_version"] == f"{sys.version_info.major}.{sys.version_info.minor}" == "3.11"

    assert meta.get("colorFrom") in HUB_COLOURS and meta.get("colorTo") in HUB_COLOURS, (meta.get("colorFrom"),
                                                                                       meta.get("colorTo"))
    assert is_one_emoji(str(meta.get("emoji", ""))), meta.get("emoji")
    assert str(meta.get("license", "")).strip()
    assert isinstance(meta.get("pinned", False), bool)


# --- LFS -----------------------------------------------------------------------------------------------------------
# This repository does not use git-lfs and holds no LFS rules, so a clone is clean whether or not git-lfs is installed
# (with rules, git-lfs would see the plain blobs of the history as modified files). The LFS rules a Space needs are
# written when deploying: upload_folder keeps the Space's own .gitattributes, and docs/deploying.md's
# `git lfs migrate import --include=...` writes them for a git push.

def git(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, **kw)


needs_git = pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git clone")


def tracked_files() -> list[str]:
    return [f for f in git("ls-files", "-z").stdout.split("\0") if f and (ROOT / f).is_file()]


@needs_git
def test_no_file_is_under_an_lfs_filter():
    files = tracked_files()
    out = git("check-attr", "-z", "filter", "--", *files).stdout.split("\0")
    filtered = sorted(f for f, value in zip(out[0::3], out[2::3]) if value not in ("unspecified", "unset"))
    assert not filtered, f"files git-lfs would filter in a clone (and show as modified): {filtered[:5]}"


@needs_git
def test_the_git_deploy_moves_every_large_or_binary_file_to_lfs():
    """docs/deploying.md's `git lfs migrate import --include=...` covers every file the Hub would refuse as a plain
    blob (over 10 MB, or binary), which the Hub's own .gitattributes rules (HUB_LFS_PATTERNS) do for a new Space."""
    import fnmatch

    doc = (ROOT / "docs" / "deploying.md").read_text(encoding="utf-8")
    m = re.search(r'git lfs migrate import --everything --include="([^"]+)"', doc)
    assert m, "docs/deploying.md does not give the git lfs migrate command"
    include = m.group(1).split(",")
    assert set(IMAGE_PATTERNS) <= set(include) and "*.safetensors" in include, include
    need = [f for f in tracked_files()
            if (ROOT / f).stat().st_size > LARGE or Path(f).suffix.lower() in BINARY_SUFFIXES]
    assert "captioner/default_model/model.safetensors" in need  # the 35 MB model the Hub would refuse as a plain blob
    outside = [f for f in need if not any(fnmatch.fnmatch(Path(f).name, p) for p in include)]
    assert not outside, f"large or binary files the deploy's --include leaves as plain blobs: {outside}"
    assert all(any(fnmatch.fnmatch(Path(f).name, p) for p in HUB_LFS_PATTERNS + IMAGE_PATTERNS) for f in need)


# --- requirements ---------------------------------------------------------------------------------------------------

def imports_of(path: Path) -> dict[str, bool]:
    """{top-level module: imported at module level?} of a file's absolute imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    at_top = {id(node) for node in tree.body}
    out: dict[str, bool] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            out[top] = out.get(top, False) or id(node) in at_top
    return out


def third_party(files, local: set[str]) -> dict[str, list[str]]:
    """{top-level module: [files importing it]} for modules neither in the standard library nor in this repository."""
    found: dict[str, list[str]] = {}
    for f in files:
        for module in imports_of(f):
            if module not in sys.stdlib_module_names and module not in local and module != "__future__":
                found.setdefault(module, []).append(str(f.relative_to(ROOT)))
    return found


def distributions(module: str) -> set[str]:
    dists = importlib.metadata.packages_distributions().get(module)
    assert dists, f"no installed distribution provides {module!r}: is it in the requirements?"
    return {normalize(d) for d in dists}


def app_files() -> list[Path]:
    return [ROOT / "app.py", *sorted((ROOT / "captioner").rglob("*.py"))]  # captioner/app/ included


def local_modules() -> set[str]:
    names = {p.stem for d in (ROOT, ROOT / "tests", ROOT / "benchmarks", ROOT / "train", ROOT / "scripts")
             for p in d.glob("*.py")}
    return names | {p.parent.name for p in ROOT.glob("*/__init__.py")}


def test_requirements_txt_holds_what_the_app_imports_and_nothing_for_training():
    runtime = pins("requirements.txt")
    assert runtime.get("torch") == "2.14.1"
    assert not NOT_RUNTIME & runtime.keys(), sorted(NOT_RUNTIME & runtime.keys())
    train = pins("requirements-train.txt")
    missing = []
    for module, where in sorted(third_party(app_files(), local_modules()).items()):
        if module in OPTIONAL_AT_RUNTIME:
            # Only imported inside the functions named above, never when the app starts, and installed for training.
            at_top = [f for f in where if imports_of(ROOT / f)[module]]
            assert not at_top, f"{module} is imported at module level: {at_top}"
            assert normalize(module) in train, f"{module}: not in requirements-train.txt"
            continue
        if not distributions(module) & runtime.keys():
            missing.append(f"{module} ({', '.join(where)})")
    assert not missing, f"imported by the app but not in requirements.txt: {missing}"


@pytest.mark.slow
def test_training_and_dev_requirements_cover_their_imports():
    runtime, train, dev = pins("requirements.txt"), pins("requirements-train.txt"), pins("requirements-dev.txt")
    assert "-r requirements.txt" in (ROOT / "requirements-train.txt").read_text().splitlines()
    assert "-r requirements-train.txt" in (ROOT / "requirements-dev.txt").read_text().splitlines()
    assert not (runtime.keys() & train.keys() or train.keys() & dev.keys() or runtime.keys() & dev.keys())
    local = local_modules()
    for folders, allowed in [(["train"], runtime | train), (["tests", "benchmarks", "scripts"], runtime | train | dev)]:
        files = [f for d in folders for f in sorted((ROOT / d).glob("*.py"))]
        for module, where in sorted(third_party(files, local).items()):
            if module in {"tomllib", "tomli"}:
                continue
            # Either pinned, or installed by something pinned (yaml by gradio, pandas by gradio, ...).
            dists = importlib.metadata.packages_distributions().get(module)
            assert dists, f"{module} ({where}): not installed, not in the requirements"
            if not {normalize(d) for d in dists} & allowed.keys():
                assert any(normalize(d) in required_by_pins(allowed) for d in dists), f"{module} ({where})"


def required_by_pins(pinned: dict[str, str]) -> set[str]:
    """The distributions the pinned ones pull in, transitively (from the installed metadata)."""
    seen, todo = set(), list(pinned)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for req in requires:
            if "extra ==" not in req:
                todo.append(normalize(re.match(r"[A-Za-z0-9._-]+", req).group(0)))
    return seen


# --- scripts/setup.sh's stamp ---------------------------------------------------------------------------------------

REQUIREMENTS = ["requirements.txt", "requirements-train.txt", "requirements-dev.txt"]
MODE_FILES = {"runtime": REQUIREMENTS[:1], "train": REQUIREMENTS[:2], "dev": REQUIREMENTS}


def stamp_text(folder: Path, mode: str) -> str:
    """What setup.sh stores in .venv/.requirements-<mode>.sha256: `sha256sum` of the mode's files (+ pyproject.toml)."""
    files = MODE_FILES[mode] + (["pyproject.toml"] if (folder / "pyproject.toml").exists() else [])
    return "".join(f"{hashlib.sha256((folder / f).read_bytes()).hexdigest()}  {f}\n" for f in files)


@pytest.fixture
def setup_copy(tmp_path):
    """A copy of scripts/ and the requirement files in tmp_path, with a .venv whose bin/python logs its arguments to
    python.log and then runs the real interpreter (pip acts on the real venv; nothing is installed by these tests)."""
    shutil.copytree(ROOT / "scripts", tmp_path / "scripts")
    for f in REQUIREMENTS + ["pyproject.toml"]:
        if (ROOT / f).exists():
            shutil.copy(ROOT / f, tmp_path / f)
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\necho "$@" >> "{tmp_path}/python.log"\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    return tmp_path


def run_setup(folder: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_NO_INDEX="1", PIP_INDEX_URL="http://127.0.0.1:9/", PIP_CONFIG_FILE=os.devnull)  # no index to reach
    return subprocess.run(["bash", str(folder / "scripts" / "setup.sh"), *args], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=300)


def python_calls(folder: Path) -> list[str]:
    log = folder / "python.log"
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize("mode, stamped", [("dev", "dev"), ("runtime", "runtime"), ("runtime", "dev"),
                                           ("train", "dev")])
def test_setup_does_nothing_while_the_stamp_matches(setup_copy, mode, stamped):
    (setup_copy / ".venv" / f".requirements-{stamped}.sha256").write_text(stamp_text(setup_copy, stamped))
    r = run_setup(setup_copy, *([] if mode == "runtime" else [mode]))
    assert r.returncode == 0, r.stderr
    assert "requirements unchanged: nothing to install" in r.stdout
    assert python_calls(setup_copy) == []  # no pip at all: no network, no reinstall, no pip upgrade


def test_setup_installs_when_the_requirements_change_and_stamps_only_on_success(setup_copy):
    stamp = setup_copy / ".venv" / ".requirements-runtime.sha256"
    stamp.write_text(stamp_text(setup_copy, "runtime"))
    (setup_copy / "requirements-dev.txt").write_text("-r requirements-train.txt\n")  # dev changed: not runtime's stamp
    assert "nothing to install" in run_setup(setup_copy).stdout

    (setup_copy / "requirements.txt").write_text("captioner-no-such-package==0.0.1\n")  # runtime changed
    r = run_setup(setup_copy)
    assert r.returncode != 0
    assert "No matching distribution found for captioner-no-such-package==0.0.1" in r.stderr, r.stderr
    assert python_calls(setup_copy) == ["-m pip install -q -r requirements.txt"]  # pip is not upgraded: the venv exists
    assert stamp.read_text() != stamp_text(setup_copy, "runtime")  # a failed install leaves the old stamp


def test_setup_writes_the_stamp_after_installing(setup_copy):
    python = setup_copy / ".venv" / "bin" / "python"
    python.write_text(f'#!/bin/sh\necho "$@" >> "{setup_copy}/python.log"\n')  # a pip that succeeds, installing nothing
    r = run_setup(setup_copy, "train")
    assert r.returncode == 0, r.stderr
    calls = ["-m pip install -q -r requirements-train.txt"]
    if (setup_copy / "pyproject.toml").exists():
        calls.append("-m pip install -q --no-deps -e .")
    assert python_calls(setup_copy) == calls
    assert (setup_copy / ".venv" / ".requirements-train.sha256").read_text() == stamp_text(setup_copy, "train")
    r = run_setup(setup_copy)  # runtime: covered by the train stamp
    assert "nothing to install" in r.stdout and python_calls(setup_copy) == calls

    (setup_copy / "pyproject.toml").write_text("[project]\nname = 'captioner'\n")  # pyproject.toml is in the stamp
    r = run_setup(setup_copy, "train")
    assert r.returncode == 0, r.stderr
    assert python_calls(setup_copy)[-2:] == ["-m pip install -q -r requirements-train.txt",
                                             "-m pip install -q --no-deps -e ."]


def test_setup_rejects_an_unknown_mode(setup_copy):
    r = run_setup(setup_copy, "everything")
    assert r.returncode == 2 and "usage" in r.stderr
    assert python_calls(setup_copy) == []


# --- tests/conftest.py: a test run leaves the clone as it found it -------------------------------------------------

@pytest.mark.skipif(shutil.which("git") is None, reason="no git")
@pytest.mark.parametrize("where, code", [("tmp", 0), ("repo", 1), ("tracked", 1)])
def test_a_test_run_that_writes_into_the_clone_fails(tmp_path, where, code):
    repo = tmp_path / "repo"
    (repo / "tests").mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "conftest.py", repo / "tests" / "conftest.py")
    (repo / "tracked.txt").write_text("as committed\n")
    (repo / ".gitignore").write_text("__pycache__/\n")
    target = {"tmp": "tmp_path / 'out.txt'", "repo": "ROOT / 'out.txt'", "tracked": "ROOT / 'tracked.txt'"}[where]
    (repo / "tests" / "test_writes.py").write_text(
        "from pathlib import Path\nROOT = Path(__file__).resolve().parents[1]\n\n"
        f"def test_writes(tmp_path):\n    ({target}).write_text('written by a test')\n")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "."], cwd=repo, check=True)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp",
                        str(tmp_path / "base"), "tests"], cwd=repo, capture_output=True, text=True, timeout=300)
    assert r.returncode == code, r.stdout + r.stderr
    assert "1 passed" in r.stdout
    if code:
        assert "The test run changed the working tree" in r.stdout
        assert {"repo": "?? out.txt", "tracked": "M tracked.txt"}[where] in r.stdout


# --- tests/conftest.py: in CI a skip fails the run, the quick tier only deselects --------------------------------------

def test_a_skip_fails_in_ci_unless_marked_may_skip_and_the_quick_tier_deselects(tmp_path):
    repo = tmp_path / "repo"
    (repo / "tests").mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "conftest.py", repo / "tests" / "conftest.py")
    shutil.copy(ROOT / "pytest.ini", repo / "pytest.ini")  # the markers, testpaths
    (repo / "tests" / "test_skips.py").write_text(
        "import pytest\n\n"
        "def test_runs():\n    pass\n\n"
        "def test_skips():\n    pytest.skip('chromium is missing')\n\n"  # in the test, as importorskip does
        "@pytest.mark.may_skip\n@pytest.mark.skip(reason='another OS')\ndef test_may_skip():\n    pass\n\n"
        "@pytest.mark.slow\n@pytest.mark.skipif(True, reason='Flickr8k not found')\ndef test_slow_skips():\n    pass\n")

    def run(ci: str | None, *args):
        env = {k: v for k, v in os.environ.items() if k != "CI"}
        if ci is not None:
            env["CI"] = ci
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp",
                               str(tmp_path / "base"), *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300)

    # the full suite in CI: both plain skips fail (one in its call, one at setup, which pytest counts as an error);
    # the may_skip one stays a skip
    r = run("true")
    assert r.returncode == 1 and "1 failed, 1 passed, 1 skipped, 1 error" in r.stdout, r.stdout + r.stderr
    assert "skipped in CI (CI=true), where every test must run: Skipped: chromium is missing" in r.stdout
    assert "FAILED tests/test_skips.py::test_skips" in r.stdout and "ERROR tests/test_skips.py::test_slow_skips" in r.stdout
    # the quick tier in CI: the slow test is deselected, not skipped, so it fails nothing; the other skip still fails
    r = run("true", "-m", "not slow")
    assert r.returncode == 1 and "1 failed, 1 passed, 1 skipped, 1 deselected" in r.stdout, r.stdout + r.stderr
    assert "Flickr8k" not in r.stdout
    r = run(None)  # outside CI a skip is a skip
    assert r.returncode == 0 and "1 passed, 3 skipped" in r.stdout, r.stdout + r.stderr
