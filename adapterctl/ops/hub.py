"""Hub repo ids wherever an adapter or a base model is accepted: what is a repo id, fetching
through huggingface_hub's cache, and one mapping of the client's errors to ours.

huggingface_hub is imported inside the functions (never for local paths). The endpoint is read
from HF_ENDPOINT at call time and passed explicitly, so nothing depends on import order; HF_TOKEN,
HF_HOME and HF_HUB_OFFLINE are the client's own. A token is never put in a message.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from adapterctl.errors import AdapterctlError, AdapterNotFoundError, InvalidOptionError
from adapterctl.format.config import CONFIG_NAME
from adapterctl.format.files import read_optional, read_small
from adapterctl.format.layout import BIN_NAME, README_NAME, SAFETENSORS_NAME, missing

DEFAULT_ENDPOINT = "https://huggingface.co"
_NAME = r"[A-Za-z0-9](?:[\w.-]{0,94}[\w])?"
_REPO_ID = re.compile(rf"(?:{_NAME}/)?{_NAME}")
#: a base model's files besides its weights: config, generation config, tokenizer (top level only)
BASE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "spiece.model",
    "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "preprocessor_config.json",
)  # fmt: skip
INDEX_NAME = "model.safetensors.index.json"


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def shown_endpoint() -> str:
    """The endpoint as messages show it: without any `user:password@` it may carry."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(endpoint())
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def valid_repo_id(text: str) -> bool:
    """`name` or `owner/name` as the Hub spells them (huggingface_hub's own rules)."""
    if not _REPO_ID.fullmatch(text) or ".." in text or "--" in text or text.endswith(".git"):
        return False
    from huggingface_hub.utils._validators import validate_repo_id

    try:
        validate_repo_id(text)
    except ValueError:
        return False
    return True


_LOCAL_PREFIXES = ("./", "../", "/", "~", ".\\", "..\\")
_FILE_SUFFIXES = (".safetensors", ".bin", ".json", ".pt", ".pth")


def _first_part(text: str) -> str:
    return text.split("/", 1)[0]


def is_local_path(text: str) -> bool:
    """THE rule for what a SOURCE or BASE names: a local path when it starts with `./`, `../`,
    `/` or `~` (or is `.`/`..`), has more than one `/`, ends in a file suffix, exists, or its first
    part exists locally (`checkpoint/mth` beside a `checkpoint` folder). Everything else that is
    a valid Hub repo id goes to the Hub (see `is_repo_id`)."""
    return (
        text in (".", "..")
        or text.startswith(_LOCAL_PREFIXES)
        or text.count("/") > 1
        or text.endswith(_FILE_SUFFIXES)
        or os.path.lexists(text)
        or os.path.lexists(_first_part(text))
    )


def is_repo_id(source: str | os.PathLike[str], *, bare: bool = False) -> bool:
    """A Hub id that is not a local path (local paths win, as in transformers): `owner/name`, or
    also a bare `name` with `bare` (base models such as `gpt2`)."""
    text = os.fspath(source)
    if not text or is_local_path(text) or ("/" not in text and not bare):
        return False
    return valid_repo_id(text)


def hub_or_local(source: str | os.PathLike[str], *, bare: bool = False) -> str | Path:
    """The Hub repo id `source` names, or the local path it names, which must exist: a mistyped
    local path is an error at once, never a request to the Hub. `bare`: base models, where a
    bare `name` (`gpt2`) is a Hub id too."""
    if is_repo_id(source, bare=bare):
        return os.fspath(source)
    path = Path(source)
    if os.path.lexists(path):
        return path
    text = os.fspath(source)
    first = _first_part(text)
    if text.startswith(_LOCAL_PREFIXES) or text in (".", ".."):
        why = ""  # plainly a path
    elif "/" in text and first and os.path.lexists(first):
        why = f" (a local path, not a Hub repo id: `{first}` exists here)"
    elif text.count("/") > 1:
        why = " (a local path: a Hub repo id is OWNER/NAME)"
    elif "/" not in text and not bare:
        why = " (a local path: an adapter on the Hub is named OWNER/NAME)"
    else:
        why = " (a local path: it is not a valid Hub repo id)"
    parent = next(  # the deepest folder of it that exists (not `.` or `/`: no news)
        (p for p in path.parents if str(p) not in (".", p.anchor) and os.path.lexists(p)), None
    )
    hint = f"`{parent}` exists; check the rest of the path" if parent is not None else None
    raise missing(
        text, why, hint or (None if not why else "check the path; a Hub repo id is OWNER/NAME")
    )


def label(repo_id: str, *, revision: str | None = None, subfolder: str | None = None) -> str:
    """How a Hub source is named in reports: hf://owner/name[@revision][/subfolder]."""
    rev = f"@{revision}" if revision else ""
    sub = f"/{subfolder.strip('/')}" if subfolder else ""
    return f"hf://{repo_id}{rev}{sub}"


def _is_connection_error(e: BaseException) -> bool:
    """A network failure, or an error the client raised because of one (it wraps failed LFS
    uploads in a RuntimeError)."""
    seen = 0
    cause: BaseException | None = e
    while cause is not None and seen < 8:
        module = type(cause).__module__.split(".")[0]
        if module in ("httpx", "httpx2", "httpcore") or isinstance(cause, ConnectionError):
            return True
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return False


def _client_dirs() -> list[tuple[str, str]]:
    """The folders huggingface_hub reads and writes, with the variable that sets each."""
    from huggingface_hub import constants

    return [
        ("HF_HOME", constants.HF_HOME),
        ("HF_HUB_CACHE", constants.HF_HUB_CACHE),
        ("HF_TOKEN_PATH", os.path.dirname(constants.HF_TOKEN_PATH)),
    ]


def check_client_dirs() -> None:
    """Refuse, as one error, a Hub cache or home that cannot be a directory (HF_HOME set to a
    file): huggingface_hub would fail deep inside with NotADirectoryError."""
    for variable, folder in _client_dirs():
        here = Path(folder)
        while not os.path.lexists(here) and here != here.parent:  # the nearest thing that exists
            here = here.parent
        if not here.is_dir():
            what = (
                "is not a directory"
                if here == Path(folder)
                else f"cannot be made: `{here}` is a file"
            )
            raise AdapterctlError(
                f"the Hugging Face folder `{folder}` ({variable}) {what}",
                hint=f"point {variable} at a directory (or unset it)",
            )


def _in_client_dirs(filename: object) -> str | None:
    """The variable whose folder holds `filename` (a path huggingface_hub failed on), if any."""
    if not isinstance(filename, str | os.PathLike):
        return None
    path = os.path.abspath(os.fspath(filename))
    for variable, folder in _client_dirs():
        root = os.path.abspath(folder)
        if path == root or path.startswith(root.rstrip(os.sep) + os.sep):
            return variable
    return None


def check_token_file() -> None:
    """The token file huggingface_hub reads when no token is given (HF_TOKEN_PATH, else
    HF_HOME/token) must be a small regular file: a FIFO or `/dev/zero` there would block or fill
    memory inside the client. Checked by adapterctl's own bounded reader before the client runs."""
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return  # the client takes the environment's token and never opens the file
    from huggingface_hub import constants

    read_optional(constants.HF_TOKEN_PATH, "token file")


@contextlib.contextmanager
def hub_errors(
    repo_id: str, *, revision: str | None = None, path: str | None = None, action: str = "read"
) -> Iterator[None]:
    """huggingface_hub's exceptions as one `error:` line each (never a traceback, never a token);
    the token file the client would read is checked first."""
    from huggingface_hub import errors

    check_client_dirs()
    check_token_file()

    where = f"`{repo_id}`" + (f" at revision `{revision}`" if revision else "")
    token_hint = "pass --token, set HF_TOKEN, or log in with `hf auth login`"
    client_log = logging.getLogger("huggingface_hub")
    level = client_log.level
    client_log.setLevel(logging.ERROR)  # its warnings ("no files matched", "skipping empty
    try:  # commit") become our own messages and results
        yield
    except errors.RevisionNotFoundError as e:
        raise AdapterNotFoundError(
            f"Hub repo `{repo_id}` has no revision `{revision or 'main'}`",
            hint="check the branch, tag or commit id",
        ) from e
    except errors.LocalEntryNotFoundError as e:
        why = "HF_HUB_OFFLINE is set" if offline() else "the Hub cannot be reached"
        raise AdapterNotFoundError(
            f"Hub repo {where} is not in the local cache and {why}",
            hint="unset HF_HUB_OFFLINE and check the connection (HF_ENDPOINT)"
            if offline()
            else f"check the connection to {shown_endpoint()} (HF_ENDPOINT)",
        ) from e
    except errors.EntryNotFoundError as e:
        raise AdapterNotFoundError(
            f"Hub repo {where} has no file `{path or '?'}`",
            hint="check --subfolder and the repo's files",
        ) from e
    except errors.GatedRepoError as e:
        raise AdapterctlError(
            f"Hub repo `{repo_id}` is gated: access must be requested on its page",
            hint=token_hint,
        ) from e
    except errors.RepositoryNotFoundError as e:
        if action != "read":  # the Hub answers 401 as "not found" on https repo URLs for writes
            raise AdapterctlError(
                f"authentication failed for {repo_id}",
                hint=f"{token_hint}, with a token that may write to `{repo_id}`",
            ) from e
        raise AdapterNotFoundError(
            f"`{repo_id}` is not a local path, and the Hub at {shown_endpoint()} has no repo "
            f"`{repo_id}` (or it is private and the token given cannot see it)",
            hint=f"check the path or id; for a private repo {token_hint}",
        ) from e
    except errors.HFValidationError as e:
        raise AdapterNotFoundError(
            f"`{repo_id}` is neither a local path nor a valid Hub repo id: {str(e).splitlines()[0]}"
        ) from e
    except errors.OfflineModeIsEnabled as e:
        raise AdapterctlError(
            f"cannot {action} Hub repo `{repo_id}`: HF_HUB_OFFLINE is set",
            hint="unset HF_HUB_OFFLINE",
        ) from e
    except errors.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise AdapterctlError(f"authentication failed for {repo_id}", hint=token_hint) from e
        if status == 412:  # the parent commit given is no longer the branch's head
            raise AdapterctlError(
                f"Hub repo {where} changed while pushing: another commit landed meanwhile, and "
                "nothing was committed over it",
                hint="push again",
            ) from e
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise AdapterctlError(
            f"the Hub at {shown_endpoint()} refused to {action} `{repo_id}` ({status}): {first}"
        ) from e
    except OSError as e:
        variable = _in_client_dirs(e.filename)
        if variable is None and not _is_connection_error(e):
            raise
        if variable is not None:  # the client's own files: its cache, its token
            raise AdapterctlError(
                f"cannot use the Hugging Face folder for `{repo_id}`: {e.strerror or e}: "
                f"`{e.filename}`",
                hint=f"{variable} must name a directory this user may write",
            ) from e
        raise AdapterctlError(
            f"lost the connection to the Hub at {shown_endpoint()} while trying to {action} "
            f"`{repo_id}`: {type(e).__name__}",
            hint="check the connection and try again; nothing was claimed done",
        ) from e
    except Exception as e:
        if not _is_connection_error(e):
            if isinstance(e, RuntimeError) and str(e).startswith("Error while uploading"):
                raise AdapterctlError(
                    f"upload to `{repo_id}` failed: {e.__cause__ or e}",
                    hint="nothing was committed; try again",
                ) from e
            raise
        raise AdapterctlError(
            f"lost the connection to the Hub at {shown_endpoint()} while trying to {action} "
            f"`{repo_id}`: {type(e).__name__}",
            hint="check the connection and try again; nothing was claimed done",
        ) from e
    finally:
        client_log.setLevel(level)


def api(token: str | None = None) -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint(), token=token)


def subfolder_prefix(subfolder: str | None) -> str:
    """`subfolder` as a repo path prefix (`sub/`, or empty), refusing `..` and absolute paths."""
    if not subfolder:
        return ""
    sub = subfolder.strip("/")
    if ".." in sub.split("/") or sub.startswith("/"):
        raise AdapterctlError(f"invalid subfolder {subfolder!r}")
    return sub + "/"


def download_adapter(
    repo_id: str,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """The adapter's files (config, weights, README; every adapter's when there is no subfolder)
    fetched into the Hub cache; returns the local folder (the subfolder's when given)."""
    from huggingface_hub import snapshot_download

    sub = subfolder_prefix(subfolder)
    names = (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME)
    patterns = [f"{sub}{n}" for n in (*names, README_NAME)]
    if not sub:
        patterns += [f"*/{n}" for n in names]
    with hub_errors(repo_id, revision=revision):
        root = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=patterns,
            token=token,
            endpoint=endpoint(),
            cache_dir=os.fspath(cache_dir) if cache_dir is not None else None,
        )
    local = Path(root) / sub if sub else Path(root)
    if not local.is_dir() or not any(local.iterdir()):
        where = f" in `{subfolder}`" if subfolder else ""
        raise AdapterNotFoundError(
            f"Hub repo `{repo_id}` has no adapter{where}",
            hint="an adapter repo holds adapter_config.json and adapter_model.safetensors",
        )
    return local


def download_base(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """A base model's config, tokenizer and safetensors weights fetched into the Hub cache: the
    shards its index names (or model.safetensors), nothing else (not `consolidated.*`, not
    subfolders)."""
    import json

    from huggingface_hub import errors, hf_hub_download, snapshot_download

    cache = os.fspath(cache_dir) if cache_dir is not None else None
    with hub_errors(repo_id, revision=revision):
        try:
            index = hf_hub_download(
                repo_id,
                INDEX_NAME,
                revision=revision,
                token=token,
                endpoint=endpoint(),
                cache_dir=cache,
            )
            weight_map = json.loads(read_small(index, "weights index")).get("weight_map", {})
            weights = [INDEX_NAME, *sorted({v for v in weight_map.values() if "/" not in v})]
        except errors.EntryNotFoundError:
            weights = ["model.safetensors"]
        root = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=[*BASE_FILES, *weights],
                token=token,
                endpoint=endpoint(),
                cache_dir=cache,
            )
        )
    if not (root / "config.json").is_file():
        raise AdapterNotFoundError(
            f"Hub repo `{repo_id}` has no config.json: it is not a transformers model"
        )
    return root


def refuse_local_revision(found: str | Path, revision: str | None) -> None:
    """--revision selects a Hub repo's branch, tag or commit: with a local path it does nothing."""
    if revision is not None and not isinstance(found, str):
        raise InvalidOptionError(
            f"--revision does nothing for a local path (`{found}`)",
            hint="it picks a branch, tag or commit of a Hub repo id (OWNER/NAME)",
        )


#: what `resolve` is asked for: one adapter's folder (the engine loads it), a file or folder of
#: adapters read as it is (inspect, select, convert), or a base model
Kind = Literal["adapter", "adapters", "base"]


def resolve(
    source: str | os.PathLike[str],
    *,
    kind: Kind,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_revision: Literal["refuse", "ignore"] = "refuse",
) -> Path:
    """THE resolver for a SOURCE or BASE, used by every command and by the engine: the local path
    it names (which must exist), or the Hub repo id it names fetched through huggingface_hub's
    cache. Everything after `source` is a keyword: `revision` and `subfolder` are both strings.

    kind="adapters": a local file or folder as it is (the caller finds the adapters in it); from
        the Hub, every adapter's files, or the subfolder's.
    kind="adapter": the same, and it must be a folder holding adapter_config.json.
    kind="base": a bare name (`gpt2`) is a Hub id too; from the Hub, a base model's config,
        tokenizer and safetensors weights. No subfolder.

    `revision` with a local path is an error, or ignored with `local_revision="ignore"` (PEFT's
    from_pretrained ignores it).
    """
    if kind == "base" and subfolder is not None:
        raise ValueError("a base model is resolved without a subfolder")
    found = hub_or_local(source, bare=kind == "base")
    if local_revision == "refuse":
        refuse_local_revision(found, revision)
    if isinstance(found, str) and kind == "base":
        return download_base(found, revision=revision, token=token, cache_dir=cache_dir)
    if isinstance(found, str):
        path = download_adapter(
            found, revision=revision, subfolder=subfolder, token=token, cache_dir=cache_dir
        )
    else:
        path = found / subfolder if subfolder else found
    if kind == "adapter":  # one adapter's folder, wherever it came from
        if not path.is_dir():
            raise AdapterNotFoundError(
                f"`{path}` is not an adapter directory",
                hint="pass an adapter directory or a Hub repo id (OWNER/NAME)",
            )
        if not (path / CONFIG_NAME).is_file():
            raise AdapterNotFoundError(f"no adapter in `{path}`: it has no `{CONFIG_NAME}`")
    return path
