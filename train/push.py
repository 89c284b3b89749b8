"""Publish a trained captioner folder to the Hugging Face Hub.

    python -m train.push --model runs/best --repo USER/NAME [--branch B] [--private] [--token T] [--message M]

The folder is first loaded with `captioner.hub.load` (strict: config.json + model.safetensors + vocab.json must agree),
so a broken or incomplete export is never published. Then the repo is created if needed (`exist_ok`), the branch too
if one is given, and the model files (plus README.md, the model card, when present) are uploaded in one commit; the
commit URL is printed. Only the model files are sent, never other things a run folder may hold (checkpoints with
optimizer state, logs): add more with --include PATTERN. The token comes from --token, else HF_TOKEN or `hf auth
login`; HF_ENDPOINT picks another Hub. Errors print one line (no stack trace) and exit with a non-zero code:
2 for bad arguments, 1 for a folder that is not a loadable captioner or a failed upload.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

CARD_FILE = "README.md"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.push",
        description="Publish a captioner model folder (config.json, model.safetensors, vocab.json) to the Hugging Face Hub.",
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="the model folder (written by save_pretrained / the training run)")
    parser.add_argument("--repo", required=True, metavar="USER/NAME", help="the Hub repo id to publish to (created if missing)")
    parser.add_argument("--branch", "--revision", dest="branch", default=None, metavar="B",
                        help="commit to this branch (created from main if missing); default: main")
    parser.add_argument("--private", action="store_true", help="create the repo as private (an existing repo keeps its visibility)")
    parser.add_argument("--token", default=None, help="a Hub token with write access (default: HF_TOKEN or the `hf auth login` token)")
    parser.add_argument("--message", "-m", default=None, metavar="M", help="the commit message")
    parser.add_argument("--include", action="append", default=[], metavar="PATTERN", help="also upload files matching this glob (repeatable)")
    return parser


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def _http_error_message(error, repo: str) -> str:
    """One readable line for a Hub HTTP error, with what to do for the usual causes."""
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    detail = getattr(error, "server_message", None) or str(error).strip().splitlines()[0]
    hint = ""
    if status in (401, 403):
        hint = "; check that your token has write access to this namespace (--token, HF_TOKEN or `hf auth login`)"
    elif status == 404:
        hint = "; check the repo id and the branch"
    where = f"HTTP {status}: " if status else ""
    return f"could not publish to {repo!r}: {where}{detail}{hint}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    folder = Path(args.model).expanduser()
    if not folder.is_dir():
        return _fail(f"model folder {str(folder)!r} does not exist (or is not a folder)")

    from captioner.hub import ASSESS_FILE, MODEL_FILES, ModelLoadError
    from captioner.model import Captioner

    try:
        Captioner.from_pretrained(folder)  # strict: refuses a folder that would not load back from the Hub
    except ModelLoadError as e:
        return _fail(f"not a loadable captioner, nothing was published: {e}")

    from huggingface_hub import HfApi
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(args.repo)
    except HFValidationError as e:
        return _fail(f"bad --repo {args.repo!r}: {e}")

    patterns = [*MODEL_FILES, CARD_FILE, ASSESS_FILE, *args.include]  # ASSESS_FILE where train.assess wrote one
    if not (folder / CARD_FILE).is_file():
        print(f"note: {folder} has no {CARD_FILE}; the Hub page will have no model card (save_pretrained writes one)", file=sys.stderr)

    import httpx2

    api = HfApi(token=args.token)
    try:
        repo_url = api.create_repo(args.repo, private=args.private or None, exist_ok=True)
        if args.branch and args.branch != "main":
            api.create_branch(repo_url.repo_id, branch=args.branch, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_url.repo_id,
            folder_path=folder,
            revision=args.branch,
            allow_patterns=patterns,
            commit_message=args.message or f"Upload captioner from {folder.resolve().name}",
        )
    except httpx2.HTTPError as e:  # HfHubHTTPError (4xx/5xx answers) and connection errors
        if getattr(e, "response", None) is not None and hasattr(e, "server_message"):
            return _fail(_http_error_message(e, args.repo))
        return _fail(f"could not reach the Hub to publish {args.repo!r}: {e}")
    except (OSError, ValueError) as e:  # offline mode, missing token, invalid arguments caught client-side
        return _fail(f"could not publish to {args.repo!r}: {e}")

    print(f"published {folder} to {repo_url.repo_id}" + (f" (branch {args.branch})" if args.branch else ""))
    print(commit.commit_url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
