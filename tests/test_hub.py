"""Publishing and loading captioners through the REAL huggingface_hub client, against a FAKE local Hub (tests/hubserver.py).

huggingface_hub reads HF_ENDPOINT when it is imported, so everything that downloads runs in a subprocess whose
environment points at the fake server (with its own HF_HOME cache). To keep the test fast, the subprocesses are few:
one `python -m train.push`, one online client run (several loads, one push_to_hub), one offline client run
(HF_HUB_OFFLINE=1, same cache) and one with the Hub down (connection refused, same cache); the tests below check
their recorded results. The CLI's error paths run in-process.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from hubserver import FakeHub  # noqa: E402
from tiny import decoder_probe, fingerprint, tiny_model  # noqa: E402

SUBPROCESS_TIMEOUT = 300  # seconds; generous: each subprocess imports torch on a busy machine
LFS_THRESHOLD = 64 * 1024  # bytes: model.safetensors (~440 kB) is an LFS file, config.json and vocab.json are regular
QUICK = 5.0  # seconds an error may take to come back (the fake answers in milliseconds; retries/timeouts would not)

# Runs in a subprocess: executes JSON steps ("load" a model and summarise it, or "push" a tiny model with
# Captioner.push_to_hub) and prints one JSON line of results. Each step's errors are recorded, not raised.
CLIENT = textwrap.dedent(
    """
    import json, sys, time
    import captioner
    from tiny import decoder_probe, fingerprint, tiny_model

    results = []
    for step in json.loads(sys.argv[1]):
        start = time.perf_counter()
        try:
            if step["op"] == "load":
                model = captioner.Captioner.from_pretrained(step["src"], revision=step.get("revision"))
                out = {"ok": True, "fingerprint": fingerprint(model), "probe": decoder_probe(model), "vocab": model.vocab.itos}
            else:
                info = tiny_model(step["seed"]).push_to_hub(step["repo"])
                out = {"ok": True, "oid": info.oid, "commit_url": info.commit_url}
        except Exception as e:
            out = {"ok": False, "error": type(e).__name__, "message": str(e)}
        out["seconds"] = time.perf_counter() - start
        results.append(out)
    print("RESULTS " + json.dumps(results))
    """
)


def _pythonpath() -> str:
    return os.pathsep.join([str(ROOT), str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])


def _dead_endpoint() -> str:
    """An endpoint where nothing listens (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def run_client(hub: FakeHub, hf_home: Path, named_steps: list[tuple[str, dict]], *, offline: bool = False, endpoint: str | None = None) -> dict[str, dict]:
    """Run the named CLIENT steps in one subprocess; returns {name: result}."""
    steps = [step for _, step in named_steps]
    env = hub.env(hf_home, offline=offline)
    env["PYTHONPATH"] = _pythonpath()
    if endpoint is not None:
        env["HF_ENDPOINT"] = endpoint
    proc = subprocess.run(
        [sys.executable, "-c", CLIENT, json.dumps(steps)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, f"client failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return dict(zip([name for name, _ in named_steps], json.loads(lines[-1][len("RESULTS ") :])))


def run_push_cli(hub: FakeHub, hf_home: Path, *args: str) -> subprocess.CompletedProcess:
    env = hub.env(hf_home)
    env["PYTHONPATH"] = _pythonpath()
    return subprocess.run(
        [sys.executable, "-m", "train.push", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT
    )


def summary(model) -> dict:
    return {"fingerprint": fingerprint(model), "probe": decoder_probe(model), "vocab": model.vocab.itos}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One fake Hub, models published to it in every way, and what the client subprocesses got back."""
    tmp = tmp_path_factory.mktemp("hub")
    hf_home = tmp / "hf_home"
    with FakeHub(lfs_threshold=LFS_THRESHOLD) as hub:  # weights are served like the Hub's LFS files, through a redirect
        w = {"hub": hub, "hf_home": hf_home, "models": {seed: tiny_model(seed) for seed in range(5)}}

        # Published straight into the fake's storage (no HTTP): one repo, and one with two versions.
        for seed, name in [(0, "tiny"), (1, "versions"), (2, "versions")]:
            folder = tmp / f"model{seed}"
            w["models"][seed].save_pretrained(folder)
            w.setdefault("shas", {}).setdefault(name, []).append(hub.publish_folder(folder, f"user/{name}", message=f"seed {seed}"))

        # Published with the CLI (a real subprocess: `python -m train.push`).
        w["models"][4].save_pretrained(tmp / "model4")
        w["cli"] = run_push_cli(hub, hf_home, "--model", str(tmp / "model4"), "--repo", "user/cli", "--message", "from the CLI")

        first = w["shas"]["versions"][0]
        online = [
            ("tiny", {"op": "load", "src": "user/tiny"}),
            ("v_first", {"op": "load", "src": "user/versions", "revision": first}),
            ("v_main", {"op": "load", "src": "user/versions", "revision": "main"}),
            ("v_latest", {"op": "load", "src": "user/versions"}),
            ("v_nope", {"op": "load", "src": "user/versions", "revision": "no-such-branch"}),
            ("missing", {"op": "load", "src": "user/missing"}),
            ("push", {"op": "push", "seed": 3, "repo": "user/pushed"}),
            ("pushed", {"op": "load", "src": "user/pushed"}),
            ("cli", {"op": "load", "src": "user/cli"}),
        ]
        w["online"] = run_client(hub, hf_home, online)

        before = len(hub.requests)
        offline = [
            ("tiny", {"op": "load", "src": "user/tiny"}),
            ("v_first", {"op": "load", "src": "user/versions", "revision": first}),
            ("uncached", {"op": "load", "src": "user/never-downloaded"}),
        ]
        w["offline"] = run_client(hub, hf_home, offline, offline=True)
        w["offline_requests"] = hub.requests[before:]

        # The Hub down (connection refused), same cache: the cached model still loads, an uncached one fails fast.
        down = [
            ("tiny", {"op": "load", "src": "user/tiny"}),
            ("uncached", {"op": "load", "src": "user/never-downloaded"}),
        ]
        w["down"] = run_client(hub, hf_home, down, endpoint=_dead_endpoint())
        yield w


def _loaded(result: dict) -> dict:
    assert result["ok"], f"load failed: {result.get('error')}: {result.get('message')}"
    return {k: result[k] for k in ("fingerprint", "probe", "vocab")}


def _load_error(result: dict) -> str:
    assert not result["ok"], "expected the load to fail"
    assert result["error"] == "ModelLoadError", f"expected ModelLoadError, got {result['error']}: {result['message']}"
    return result["message"]


# ------------------------------------------------------------------ download


@pytest.mark.slow
def test_client_needed_nothing_the_fake_lacks(world):
    assert not world["hub"].unsupported, f"the client used endpoints the fake Hub lacks: {world['hub'].unsupported}"


@pytest.mark.slow
def test_download_gives_identical_model(world):
    assert _loaded(world["online"]["tiny"]) == summary(world["models"][0])
    hub = world["hub"]
    sha = hub.head("user/tiny")
    fetched = {path.rsplit("/", 1)[-1] for method, path in hub.requests if method == "HEAD" and f"/user/tiny/resolve/{sha}/" in path}
    assert {"config.json", "model.safetensors", "vocab.json"} <= fetched
    snapshot = world["hf_home"] / "hub" / "models--user--tiny" / "snapshots" / sha
    assert {"config.json", "model.safetensors", "vocab.json"} <= {p.name for p in snapshot.iterdir()}
    assert ".gitattributes" not in fetched  # allow_patterns: only the model files (and the card)
    # the weights came through the LFS redirect, and are cached under their sha256 like real LFS files
    weights = (snapshot / "model.safetensors").read_bytes()
    sha256 = hashlib.sha256(weights).hexdigest()
    assert ("GET", f"/_lfs/{sha256}") in hub.requests
    assert (snapshot / "model.safetensors").resolve().name == sha256


@pytest.mark.slow
def test_offline_loads_from_cache(world):
    assert _loaded(world["offline"]["tiny"]) == summary(world["models"][0])
    assert _loaded(world["offline"]["v_first"]) == summary(world["models"][1])
    assert world["offline_requests"] == [], "HF_HUB_OFFLINE=1 must not touch the network"


@pytest.mark.slow
def test_pinned_revision_gets_that_version(world):
    assert _loaded(world["online"]["v_first"]) == summary(world["models"][1])
    assert _loaded(world["online"]["v_main"]) == summary(world["models"][2])
    assert _loaded(world["online"]["v_latest"]) == summary(world["models"][2])
    assert summary(world["models"][1]) != summary(world["models"][2])


@pytest.mark.slow
def test_unknown_revision_is_a_clear_error(world):
    message = _load_error(world["online"]["v_nope"])
    assert "no-such-branch" in message and "revision" in message
    assert world["online"]["v_nope"]["seconds"] < QUICK


@pytest.mark.slow
def test_missing_repo_is_a_quick_not_found(world):
    message = _load_error(world["online"]["missing"])
    assert "not found" in message and "user/missing" in message
    assert world["online"]["missing"]["seconds"] < QUICK


@pytest.mark.slow
def test_offline_without_cache_is_a_quick_error(world):
    message = _load_error(world["offline"]["uncached"])
    assert "cache" in message
    assert world["offline"]["uncached"]["seconds"] < QUICK


@pytest.mark.slow
def test_hub_down_falls_back_to_cache(world):
    assert _loaded(world["down"]["tiny"]) == summary(world["models"][0])
    message = _load_error(world["down"]["uncached"])
    assert "cache" in message and "unreachable" in message
    assert world["down"]["uncached"]["seconds"] < QUICK


# ------------------------------------------------------------------ publishing


@pytest.mark.slow
def test_push_to_hub_round_trip(world):
    push = world["online"]["push"]
    assert push["ok"], push
    hub = world["hub"]
    assert push["oid"] == hub.head("user/pushed")
    assert push["commit_url"] == f"{hub.url}/user/pushed/commit/{push['oid']}"
    assert {"config.json", "model.safetensors", "vocab.json", "README.md"} <= set(hub.files("user/pushed"))
    assert _loaded(world["online"]["pushed"]) == summary(world["models"][3])


@pytest.mark.slow
def test_push_cli_round_trip(world):
    cli, hub = world["cli"], world["hub"]
    assert cli.returncode == 0, cli.stderr
    sha = hub.head("user/cli")
    assert f"{hub.url}/user/cli/commit/{sha}" in cli.stdout
    repo = hub.get_repo("user/cli")
    assert repo.commits[sha].title == "from the CLI"
    assert set(hub.files("user/cli")) == {".gitattributes", "config.json", "model.safetensors", "vocab.json", "README.md"}
    assert _loaded(world["online"]["cli"]) == summary(world["models"][4])


# ------------------------------------------------------------------ train.push error paths and options, in-process


@pytest.fixture
def local_hub(monkeypatch):
    """A fresh fake Hub that needs a token for writes, with this process's huggingface_hub pointed at it."""
    import huggingface_hub.constants as constants

    with FakeHub(token="secret") as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield hub


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("push") / "model"
    tiny_model(7).save_pretrained(folder)
    return folder


def test_push_cli_refuses_a_broken_folder(local_hub, model_dir, tmp_path, capsys):
    from train.push import main

    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "model.safetensors"):  # no vocab.json
        (broken / name).write_bytes((model_dir / name).read_bytes())
    assert main(["--model", str(broken), "--repo", "user/x", "--token", "secret"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "vocab.json" in err and "Traceback" not in err

    assert main(["--model", str(tmp_path / "nowhere"), "--repo", "user/x", "--token", "secret"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert local_hub.requests == [], "nothing may be sent for a folder that does not load"


def test_push_cli_http_error_is_one_line(local_hub, model_dir, capsys):
    from train.push import main

    assert main(["--model", str(model_dir), "--repo", "user/x", "--token", "wrong"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "401" in err and "token" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert local_hub.get_repo("user/x") is None


def test_push_cli_branch_private_message(local_hub, model_dir, capsys):
    from train.push import main

    (model_dir / "optimizer.pt").write_bytes(b"not for the Hub")
    args = ["--model", str(model_dir), "--repo", "user/y", "--token", "secret", "--private", "--branch", "dev", "--message", "try dev"]
    assert main(args) == 0
    out = capsys.readouterr().out
    repo = local_hub.get_repo("user/y")
    assert repo.private
    assert set(local_hub.files("user/y", "main")) == {".gitattributes"}  # main untouched
    dev = local_hub.files("user/y", "dev")
    assert set(dev) == {".gitattributes", "config.json", "model.safetensors", "vocab.json", "README.md"}  # no optimizer.pt
    assert dev["model.safetensors"] == (model_dir / "model.safetensors").read_bytes()
    assert repo.commits[repo.branches["dev"]].title == "try dev"
    assert f"{local_hub.url}/user/y/commit/{repo.branches['dev']}" in out
    assert all(auth == "Bearer secret" for auth in local_hub.auth_seen)

    assert main(["--model", str(model_dir), "--repo", "user/bad//id", "--token", "secret"]) == 1
    assert "bad --repo" in capsys.readouterr().err


# ------------------------------------------------------------------ the fake Hub itself, with the real client in-process


def test_fake_hub_speaks_the_client_protocol(tmp_path):
    """The fake answers the real client's download/upload calls with the Hub's data and typed errors."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    with FakeHub(lfs_threshold=100) as hub:
        kw = dict(endpoint=hub.url, cache_dir=tmp_path / "cache", token=False)
        v1 = hub.commit("user/r", {"a.txt": "one", "big.bin": bytes(range(200)), "sub/c.txt": "c"}, message="v1")
        v2 = hub.commit("user/r", {"a.txt": "two"}, delete=["sub"], message="v2")
        assert v1 != v2 and len(v2) == 40 and hub.head("user/r") == v2

        assert Path(hf_hub_download("user/r", "a.txt", **kw)).read_text() == "two"
        assert Path(hf_hub_download("user/r", "a.txt", revision=v1, **kw)).read_text() == "one"
        assert Path(hf_hub_download("user/r", "big.bin", **kw)).read_bytes() == bytes(range(200))  # LFS redirect
        snap = Path(snapshot_download("user/r", revision=v1, allow_patterns=["*.txt"], **kw))
        assert sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file()) == ["a.txt", "sub/c.txt"]
        with pytest.raises(EntryNotFoundError):
            hf_hub_download("user/r", "sub/c.txt", **kw)  # deleted in v2
        with pytest.raises(RevisionNotFoundError):
            hf_hub_download("user/r", "a.txt", revision="nope", **kw)
        with pytest.raises(RepositoryNotFoundError):
            snapshot_download("user/none", **kw)

        api = HfApi(endpoint=hub.url, token="any")
        assert api.model_info("user/r").sha == v2
        assert {s.rfilename for s in api.model_info("user/r", revision=v1).siblings} == {".gitattributes", "a.txt", "big.bin", "sub/c.txt"}
        assert api.create_repo("user/new", exist_ok=True).repo_id == "user/new"
        assert api.create_repo("user/new", exist_ok=True).repo_id == "user/new"
        api.create_branch("user/new", branch="dev")
        info = api.upload_file(path_or_fileobj=b"hi", path_in_repo="x/y.txt", repo_id="user/new", revision="dev", commit_message="add y")
        assert info.oid == hub.head("user/new", "dev") != hub.head("user/new")
        assert hub.files("user/new", "dev")["x/y.txt"] == b"hi"
        api.create_tag("user/new", tag="v1", revision="dev")
        refs = api.list_repo_refs("user/new")
        assert {b.name for b in refs.branches} == {"main", "dev"} and [t.target_commit for t in refs.tags] == [info.oid]
        assert not hub.unsupported
