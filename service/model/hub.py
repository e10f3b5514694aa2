"""Models by Hugging Face hub id: ``REPO_ID[@REVISION]`` resolved to a complete local snapshot, pinned to a commit.

The hub client (``huggingface_hub``, the ``hub`` extra) does the network and the cache, so ``HF_HOME`` /
``HF_HUB_CACHE``, ``HF_TOKEN``, ``HF_HUB_OFFLINE`` and ``HF_ENDPOINT`` mean what they mean to every other hub tool.
Only configs and weights are fetched (never code): safetensors when the repository has them, else PyTorch ``.bin``
(loaded with ``weights_only``), else ``tf_model.h5``. Before a weight is fetched, ``config.json`` must name a DeiT or
ViT model, and a snapshot is used only when every file it needs is there: a cut download is never served.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from service.errors import CheckpointError

log = logging.getLogger("deit_serve.hub")

HUB_SUFFIX = ".hub"  # a model store entry ``<name>.hub`` holding one line ``REPO_ID[@REVISION]``
IMAGE_MODEL_TYPES = ("deit", "vit")
CONFIGS = ("config.json", "preprocessor_config.json")
# The weight formats in the order they are preferred; each a single file, a sharded index, and its shards.
WEIGHT_FORMATS: tuple[tuple[str, str, str], ...] = (
    ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"),
    ("tf_model.h5", "tf_model.h5.index.json", "tf_model-*-of-*.h5"),
)
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")
_NAME = re.compile(r"[A-Za-z0-9][\w.-]{0,127}")


class HubError(CheckpointError):
    """A model asked for by hub id cannot be served: the message says why and what to do."""

    code = "hub_error"

    def __init__(self, message: str, *, repo_id: str, cache: str | None = None, command: str | None = None) -> None:
        super().__init__(message)
        self.repo_id = repo_id
        self.cache = cache
        self.command = command

    def fields(self) -> dict[str, str]:
        """The structured fields of the start-up error line."""
        extra = {"repo_id": self.repo_id}
        if self.cache is not None:
            extra["cache"] = self.cache
        if self.command is not None:
            extra["command"] = self.command
        return extra


@dataclass(frozen=True)
class HubRef:
    """A model on the hub: its repository id and the revision asked for (None: the default branch)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id if self.revision is None else f"{self.repo_id}@{self.revision}"


@dataclass(frozen=True)
class Snapshot:
    """A complete local copy of a hub model at one commit."""

    ref: HubRef
    path: Path
    commit: str


def parse_ref(text: str) -> HubRef:
    """``REPO_ID[@REVISION]`` → HubRef; ValueError naming the problem."""
    repo, _, revision = text.strip().partition("@")
    if not _REPO_ID.fullmatch(repo) or ".." in repo:
        raise ValueError(f"{text!r} is not a hub model id (owner/name, e.g. facebook/deit-base-distilled-patch16-224)")
    if "@" in text and not revision.strip():
        raise ValueError(f"{text!r} names no revision after '@'")
    return HubRef(repo, revision.strip() or None)


def parse_model_option(text: str) -> tuple[str, HubRef]:
    """``[NAME=]REPO_ID[@REVISION]`` → (served name, ref); the name defaults to the repository's own name."""
    name, sep, rest = text.strip().partition("=")
    ref = parse_ref(rest if sep else name)
    served = name.strip() if sep else ref.repo_id.rsplit("/", 1)[-1]
    if not _NAME.fullmatch(served):
        raise ValueError(f"{served!r} is not a model name (letters, digits, '.', '_', '-')")
    return served, ref


def read_store_entry(path: Path) -> HubRef:
    """A ``<name>.hub`` store entry: its first non-blank, non-comment line is ``REPO_ID[@REVISION]``."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    wanted = [line for line in lines if line and not line.startswith("#")]
    if not wanted:
        raise CheckpointError(f"{path}: holds no hub model id (one line: REPO_ID[@REVISION])")
    try:
        return parse_ref(wanted[0])
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e


def _client() -> ModuleType:
    try:
        import huggingface_hub
        import huggingface_hub.utils.logging  # adds a stderr handler when first imported: before it is removed below
        from huggingface_hub.utils.tqdm import disable_progress_bars
    except ImportError as e:
        raise ImportError(
            "serving a model by hub id needs huggingface_hub: pip install 'deit-serve[hub]' (it is in the Docker image)"
        ) from e
    # The client's own notes (a retried download, say) go through the service's JSON log lines, not raw to stderr,
    # and no progress bar is drawn between them.
    hub_log = logging.getLogger("huggingface_hub")
    hub_log.handlers[:] = []
    hub_log.propagate = True
    for http_client in ("httpx", "httpx2"):  # one info line per HTTP request of the client is noise in the service log
        logging.getLogger(http_client).setLevel(logging.WARNING)
    disable_progress_bars()
    return huggingface_hub


def fill_command(ref: HubRef) -> str:
    """The command that puts ``ref`` in the cache (on a machine that reaches the hub; copy the cache over after)."""
    return "deit-serve --download-only --model " + shlex.quote(str(ref))


def cache_dir() -> str:
    """The hub cache this process reads and fills (HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    return str(_client().constants.HF_HUB_CACHE)


def resolve(ref: HubRef, pinned: str | None = None) -> Snapshot:
    """The snapshot to serve: downloaded (configs, then weights) or, offline or with the hub unreachable, from the
    cache. ``pinned``: the commit this process already serves for ``ref`` (a reload never moves to a newer one)."""
    try:
        hub = _client()
    except ImportError as e:
        raise HubError(str(e), repo_id=ref.repo_id) from e
    errors = hub.utils
    revision = pinned or ref.revision or "main"
    if pinned is not None:
        cached = _cached(hub, ref, revision)
        if cached is not None:
            return cached
    if hub.constants.HF_HUB_OFFLINE:
        return _from_cache(hub, ref, revision, reason="HF_HUB_OFFLINE is set")
    where = f"{ref.repo_id} on {hub.constants.ENDPOINT}"
    try:
        # The revision's file list first: the client asks it once, within its metadata timeout
        # (HF_HUB_ETAG_TIMEOUT), so an unreachable hub falls back to the cache at once (its file download retries
        # a refused connection for ~24 s before giving up).
        timeout = hub.constants.HF_HUB_ETAG_TIMEOUT  # the bound the client puts on its own metadata requests
        named = hub.HfApi().model_info(ref.repo_id, revision=revision, timeout=timeout)
        # Then the config, by the revision's name: the client records which commit that name is (an offline start
        # finds it by the name), and nothing large is fetched before the model type is known.
        config = Path(hub.hf_hub_download(ref.repo_id, "config.json", revision=revision))
        commit = config.parent.name
        info = named if named.sha == commit else hub.HfApi().model_info(ref.repo_id, revision=commit, timeout=timeout)
    except errors.GatedRepoError as e:
        raise HubError(
            f"{where} is gated: accept its terms on the hub with your account, then set HF_TOKEN to a token of it",
            repo_id=ref.repo_id,
        ) from e
    except errors.RevisionNotFoundError as e:
        raise HubError(f"{where} has no revision {revision!r}", repo_id=ref.repo_id) from e
    except errors.RepositoryNotFoundError as e:
        raise HubError(f"{where}: no such model repository (a private one needs HF_TOKEN)", repo_id=ref.repo_id) from e
    except errors.LocalEntryNotFoundError as e:
        return _from_cache(hub, ref, revision, reason=f"the hub is unreachable ({e})")
    except errors.EntryNotFoundError as e:
        raise HubError(f"{where} has no config.json: it is not a transformers image model", repo_id=ref.repo_id) from e
    except Exception as e:  # unreachable, timed out, 5xx: the cache may still hold it
        return _from_cache(hub, ref, revision, reason=f"the hub is unreachable ({type(e).__name__}: {e})")
    check_image_model(ref, config)
    patterns = allow_list(ref, [s.rfilename for s in info.siblings or []])
    try:
        log.info("downloading from the hub", extra={"hub_id": str(ref), "revision": commit, "cache": cache_dir()})
        path = Path(hub.snapshot_download(ref.repo_id, revision=commit, allow_patterns=patterns))
    except Exception as e:
        # The client's first line says what failed; its advice after it (a forced download from scratch) is not what
        # a start does: it resumes.
        detail = (str(e).splitlines() or [""])[0]
        raise HubError(
            f"downloading {ref} (commit {commit}) failed: {type(e).__name__}: {detail}; nothing of it is served, "
            "and the next start resumes the download",
            repo_id=ref.repo_id,
            cache=cache_dir(),
            command=fill_command(ref),
        ) from e
    check_complete(ref, path)
    return Snapshot(ref, path, commit)


def allow_list(ref: HubRef, files: list[str]) -> list[str]:
    """The files to fetch: the configs and the first weight format the repository has (never code)."""
    if "config.json" not in files:
        raise HubError(f"{ref} has no config.json: it is not a transformers image model", repo_id=ref.repo_id)
    for single, index, shards in WEIGHT_FORMATS:
        if single in files or index in files:
            return [*CONFIGS, single, index, shards]
    names = ", ".join(f[0] for f in WEIGHT_FORMATS)
    raise HubError(f"{ref} has none of the weight files served ({names})", repo_id=ref.repo_id)


def check_image_model(ref: HubRef, config: Path) -> None:
    """Refuse, before any weight is fetched, a repository whose config is not a DeiT or ViT model."""
    try:
        raw: Any = json.loads(config.read_text())
    except (OSError, ValueError) as e:
        raise HubError(f"{ref}: config.json is not readable JSON ({e})", repo_id=ref.repo_id) from e
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in IMAGE_MODEL_TYPES:
        raise HubError(
            f"{ref} is not a DeiT/ViT image model: its config.json has model_type {model_type!r} "
            f"(served: {', '.join(IMAGE_MODEL_TYPES)})",
            repo_id=ref.repo_id,
        )


def check_complete(ref: HubRef, path: Path) -> None:
    """A snapshot is served only with its config and every file of one weight format (all shards of an index)."""
    missing: list[str] = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    for single, index, _ in WEIGHT_FORMATS:
        if (path / single).is_file():
            break
        if (path / index).is_file():
            try:
                shards = set(json.loads((path / index).read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                missing.append(f"a readable {index}")
                break
            missing.extend(sorted(s for s in shards if not (path / s).is_file()))
            break
    else:
        missing.append("weights (" + ", ".join(f[0] for f in WEIGHT_FORMATS) + ")")
    if missing:
        raise HubError(
            f"the cached snapshot of {ref} at {path} is incomplete (missing {', '.join(missing)}); it is not served",
            repo_id=ref.repo_id,
            cache=cache_dir(),
            command=fill_command(ref),
        )


def _from_cache(hub: ModuleType, ref: HubRef, revision: str, reason: str) -> Snapshot:
    """The cached snapshot of ``revision``, checked complete; without one, the error that says how to fill it."""
    try:
        snapshot = _cached(hub, ref, revision, raise_missing=True)
    except HubError:
        raise
    except Exception as e:
        cache = cache_dir()
        raise HubError(
            f"{ref} is not in the hub cache {cache} and {reason}; fill the cache where the hub is reachable: "
            f"{fill_command(ref)} (with the same HF_HOME/HF_HUB_CACHE), then start again",
            repo_id=ref.repo_id,
            cache=cache,
            command=fill_command(ref),
        ) from e
    assert snapshot is not None
    return snapshot


def _cached(hub: ModuleType, ref: HubRef, revision: str, raise_missing: bool = False) -> Snapshot | None:
    """The cached snapshot of ``revision`` checked complete, or None (or the client's error) when there is none."""
    # Only the config is asked of the client: which weight format was fetched is for check_complete to find.
    try:
        path = Path(
            hub.snapshot_download(ref.repo_id, revision=revision, allow_patterns=["config.json"], local_files_only=True)
        )
    except Exception:
        if raise_missing:
            raise
        return None
    check_complete(ref, path)
    check_image_model(ref, path / "config.json")
    return Snapshot(ref, path, path.name)
