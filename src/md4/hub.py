"""Models on the Hugging Face Hub: a repo id resolves to a local snapshot folder.

    md4.load("org/name")            # the main branch, downloaded once into the Hub cache
    md4.load("org/name@v1")         # a branch, tag or commit
    HF_HUB_OFFLINE=1 md4 sample org/name    # from the cache only, no network

A Hub model repo holds what a local model folder holds (config.json + model.safetensors) and a
README.md model card (md4.publish writes all three). Downloads go through huggingface_hub's
`snapshot_download`, so its cache (HF_HOME / HF_HUB_CACHE), token and offline mode
(HF_HUB_OFFLINE) apply unchanged. Needs the `hub` extra: pip install "md4[hub]".
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from md4.errors import UserError

# org/name: letters, digits, "-", "_", "." (the Hub's own rule), not starting with "." or "-";
# an optional "@revision" (branch, tag or commit hash) follows.
REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9_][\w.-]*/[A-Za-z0-9_][\w.-]*)(?:@(?P<revision>[\w./-]+))?$")
# what a model repo must hold to be loaded, and what is downloaded (the card comes along)
MODEL_FILES = ("config.json", "model.safetensors")
DOWNLOAD = [*MODEL_FILES, "README.md"]
INSTALL = 'pip install "md4[hub]"'


def parse_repo_id(text: str) -> tuple[str, str | None] | None:
    """"org/name" or "org/name@revision" -> (repo id, revision or None); None when `text` is not
    of that form (".", absolute paths, "a/b/c", names with "--" or "..", which the Hub refuses)."""
    m = REPO_ID.match(str(text))
    if not m or "--" in m["repo"] or ".." in m["repo"] or len(m["repo"]) > 96:
        return None
    return m["repo"], m["revision"]


def _offline() -> bool:
    """HF_HUB_OFFLINE, read at each call (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")


def resolve(path: str | Path, revision: str | None = None) -> Path:
    """A local path as it is when it exists or cannot be a repo id; otherwise the local snapshot
    folder of the Hub repo `path` ("org/name" or "org/name@revision"; `revision` overrides)."""
    local = Path(path)
    parsed = None if local.exists() else parse_repo_id(str(path))
    if parsed is None:
        return local
    repo_id, rev = parsed
    rev = revision or rev
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise UserError(f"No model or run folder at {path}; to load it from the Hugging Face Hub, {INSTALL}.")
    from md4.version import __version__

    try:
        folder = Path(huggingface_hub.snapshot_download(
            repo_id, revision=rev, allow_patterns=DOWNLOAD, library_name="md4", library_version=__version__,
            local_files_only=_offline()))
    except errors.LocalEntryNotFoundError:
        raise UserError(f"No model or run folder at {path}, and the Hub model {repo_id}"
                        f"{'@' + rev if rev else ''} is not in the local cache (offline, or the Hub is unreachable).")
    except errors.RevisionNotFoundError:
        raise UserError(f"The Hub model {repo_id} has no revision {rev!r}.")
    except errors.RepositoryNotFoundError:
        raise UserError(f"No model or run folder at {path}, and no Hub model {repo_id} (or it is private: "
                        "log in with `hf auth login` or set HF_TOKEN).")
    except (errors.HfHubHTTPError, OSError, ValueError) as e:
        raise UserError(f"Could not download the Hub model {repo_id}: {str(e).splitlines()[0] if str(e) else type(e).__name__}.")
    missing = [f for f in MODEL_FILES if not (folder / f).exists()]
    if missing:
        raise UserError(f"The Hub repo {repo_id} is not an md4 model (no {' or '.join(missing)}).")
    return folder
