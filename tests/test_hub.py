"""Publishing and loading captioners through the REAL huggingface_hub client, against a FAKE local Hub (tests/hubserver.py).

huggingface_hub reads HF_ENDPOINT when it is imported, so everything that downloads runs in a subprocess whose
environment points at the fake server (with its own HF_HOME cache). To keep the test fast, the subprocesses are few:
one `python -m train.push`, one online client run (several loads, one push_to_hub), and one offline client run
(HF_HUB_OFFLINE=1, same cache); the tests below check their recorded results. The CLI's error paths run in-process.
"""
from __future__ import annotations

import json
import os
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
                model = captioner.load(step["src"], revision=step.get("revision"))
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


def run_client(hub: FakeHub, hf_home: Path, steps: list[dict], *, offline: bool = False) -> list[dict]:
    env = hub.env(hf_home, offline=offline)
    env["PYTHONPATH"] = _pythonpath()
    proc = subprocess.run(
        [sys.executable, "-c", CLIENT, json.dumps(steps)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, f"client failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1][len("RESULTS ") :])


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
    with FakeHub() as hub:
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
        w["online"] = dict(zip([k for k, _ in online], run_client(hub, hf_home, [s for _, s in online])))

        before = len(hub.requests)
        offline = [
            ("tiny", {"op": "load", "src": "user/tiny"}),
            ("v_first", {"op": "load", "src": "user/versions", "revision": first}),
            ("uncached", {"op": "load", "src": "user/never-downloaded"}),
        ]
        w["offline"] = dict(zip([k for k, _ in offline], run_client(hub, hf_home, [s for _, s in offline], offline=True)))
        w["offline_requests"] = hub.requests[before:]
        yield w
        assert not hub.unsupported, f"the client used endpoints the fake Hub lacks: {hub.unsupported}"


def _loaded(result: dict) -> dict:
    assert result["ok"], f"load failed: {result.get('error')}: {result.get('message')}"
    return {k: result[k] for k in ("fingerprint", "probe", "vocab")}


def _load_error(result: dict) -> str:
    assert not result["ok"], "expected the load to fail"
    assert result["error"] == "ModelLoadError", f"expected ModelLoadError, got {result['error']}: {result['message']}"
    return result["message"]


# ------------------------------------------------------------------ download


def test_download_gives_identical_model(world):
    assert _loaded(world["online"]["tiny"]) == summary(world["models"][0])
    hub = world["hub"]
    sha = hub.head("user/tiny")
    fetched = {path.rsplit("/", 1)[-1] for method, path in hub.requests if method == "GET" and f"/user/tiny/resolve/{sha}/" in path}
    assert {"config.json", "model.safetensors", "vocab.json"} <= fetched
    snapshot = world["hf_home"] / "hub" / "models--user--tiny" / "snapshots" / sha
    assert {"config.json", "model.safetensors", "vocab.json"} <= {p.name for p in snapshot.iterdir()}
    assert ".gitattributes" not in fetched  # allow_patterns: only the model files (and the card)


def test_offline_loads_from_cache(world):
    assert _loaded(world["offline"]["tiny"]) == summary(world["models"][0])
    assert _loaded(world["offline"]["v_first"]) == summary(world["models"][1])
    assert world["offline_requests"] == [], "HF_HUB_OFFLINE=1 must not touch the network"


def test_pinned_revision_gets_that_version(world):
    assert _loaded(world["online"]["v_first"]) == summary(world["models"][1])
    assert _loaded(world["online"]["v_main"]) == summary(world["models"][2])
    assert _loaded(world["online"]["v_latest"]) == summary(world["models"][2])
    assert summary(world["models"][1]) != summary(world["models"][2])


def test_unknown_revision_is_a_clear_error(world):
    message = _load_error(world["online"]["v_nope"])
    assert "no-such-branch" in message and "revision" in message
    assert world["online"]["v_nope"]["seconds"] < QUICK


def test_missing_repo_is_a_quick_not_found(world):
    message = _load_error(world["online"]["missing"])
    assert "not found" in message and "user/missing" in message
    assert world["online"]["missing"]["seconds"] < QUICK


def test_offline_without_cache_is_a_quick_error(world):
    message = _load_error(world["offline"]["uncached"])
    assert "cache" in message
    assert world["offline"]["uncached"]["seconds"] < QUICK


# ------------------------------------------------------------------ publishing


def test_push_to_hub_round_trip(world):
    push = world["online"]["push"]
    assert push["ok"], push
    hub = world["hub"]
    assert push["oid"] == hub.head("user/pushed")
    assert push["commit_url"] == f"{hub.url}/user/pushed/commit/{push['oid']}"
    assert {"config.json", "model.safetensors", "vocab.json", "README.md"} <= set(hub.files("user/pushed"))
    assert _loaded(world["online"]["pushed"]) == summary(world["models"][3])


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
