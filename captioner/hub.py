"""The Hub's format on disk: config.json + model.safetensors + vocab.json; resolving a folder or a Hub repo id.

This module knows files, not the model: `Captioner.from_pretrained` (model.py) builds the model from what
`resolve` and `read_folder` return, and `captioner.loading` picks the model an app or command serves.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .config import CaptionerConfig
from .vocab import VOCAB_FILE, Vocabulary

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE, VOCAB_FILE)
ASSESS_FILE = "assessment.safetensors"  # optional: familiarity statistics and confidence calibration (train.assess)


class ModelLoadError(RuntimeError):
    """A model source that cannot be loaded; the message says what happened and what to do."""


def save_folder(model, directory) -> None:
    """Write the weights and the vocabulary (the Hub mixin writes config.json beside them)."""
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if model.vocab is None:
        raise ValueError("cannot save a captioner without its vocabulary (Captioner(config, vocab))")
    save_model(model, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    model.vocab.save(directory)
    (directory / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2, sort_keys=True))


def resolve(src: str | os.PathLike, *, revision: str | None = None, cache_dir=None, local_files_only: bool = False, token=None) -> Path:
    """A local folder as is, or a Hub repo id downloaded (or found in the cache) to a local folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    text = os.fspath(src)
    if os.path.isdir(text):
        return Path(text)
    if os.path.exists(text) or text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep == "\\" and "\\" in text:
        raise ModelLoadError(f"model folder {text!r} does not exist (or is not a folder); give a folder or a Hub repo id like 'user/name'")
    where = f"{text}" + (f" at revision {revision!r}" if revision else "")
    try:
        path = snapshot_download(
            repo_id=text,
            revision=revision,
            allow_patterns=list(MODEL_FILES) + ["README.md", ASSESS_FILE],
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
        )
    except RevisionNotFoundError as e:
        raise ModelLoadError(f"Hub repo {text!r} has no revision {revision!r}; check the branch, tag or commit") from e
    except GatedRepoError as e:
        raise ModelLoadError(f"Hub repo {text!r} is gated; accept its terms on the Hub and log in (hf auth login)") from e
    except RepositoryNotFoundError as e:
        raise ModelLoadError(
            f"Hub repo {text!r} was not found (or it is private); check the id, or log in (hf auth login / HF_TOKEN) for a private repo"
        ) from e
    except LocalEntryNotFoundError as e:
        raise ModelLoadError(
            f"cannot download {where}: the Hub is unreachable (offline?) and the model is not in the local cache; "
            "connect once to download it, or pass a local model folder"
        ) from e
    except (HfHubHTTPError, OSError) as e:
        raise ModelLoadError(f"could not download {where} from the Hub: {e}") from e
    return Path(path)


def read_folder(folder: Path, src, *, map_location: str = "cpu"):
    """A model folder's (config, vocabulary, state dict), each checked; ModelLoadError says what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    missing = [f for f in MODEL_FILES if not (folder / f).is_file()]
    if missing:
        raise ModelLoadError(f"{src}: missing {', '.join(missing)}; a captioner model needs {', '.join(MODEL_FILES)}")
    try:
        config = CaptionerConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{src}: bad {CONFIG_FILE}: {e}") from e
    try:
        vocab = Vocabulary.load(folder / VOCAB_FILE)
    except (json.JSONDecodeError, ValueError) as e:
        raise ModelLoadError(f"{src}: bad {VOCAB_FILE}: {e}") from e
    if len(vocab) != config.vocab_size:
        raise ModelLoadError(
            f"{src}: {VOCAB_FILE} has {len(vocab)} words but {CONFIG_FILE} says vocab_size={config.vocab_size}; "
            "the vocabulary does not belong to these weights"
        )
    try:
        state = load_file(str(folder / WEIGHTS_FILE), device=map_location)
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"{src}: {WEIGHTS_FILE} is corrupted or truncated ({e}); download or export it again") from e
    return config, vocab, state
