"""push_adapter(): an adapter directory published to a Hub repo, checked first, with a model card.

Only adapter files go up (each chosen adapter's config and weights, and the card at the root),
never optimizer or trainer state or anything else in the folder, and the folder is never written
to: the card is built in memory, and so is a config whose base model is rewritten to the card's
Hub id. Subfolders that are Trainer checkpoints (`checkpoint-500/` with its optimizer state) are
not adapters of a multi-adapter directory and are left out unless chosen with `--adapter`. One
commit (`create_commit`, on top of the commit the push started from), so identical files make no
commit and a commit that lands meanwhile is never overwritten.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterctl.errors import AdapterctlError, AdapterNotFoundError, InvalidOptionError
from adapterctl.format.config import CONFIG_NAME, LoraConfig, edited_json
from adapterctl.format.files import read_small
from adapterctl.format.layout import (
    BIN_NAME,
    DEFAULT_ADAPTER,
    README_NAME,
    SAFETENSORS_NAME,
    adapter_subdir,
    check_inside,
    find_adapters,
    pick_adapters,
)
from adapterctl.format.variants import variant_message, variants_in
from adapterctl.ops import SCHEMA_VERSION
from adapterctl.ops.card import CardError, card_tags, card_text, facts_note, hub_id, read_card
from adapterctl.ops.hub import api, endpoint, hub_errors, valid_repo_id
from adapterctl.ops.inspect import report_adapter

log = logging.getLogger(__name__)
#: files a transformers Trainer writes into each checkpoint folder besides the adapter
TRAINER_FILES = (
    "optimizer.pt", "scheduler.pt", "trainer_state.json", "training_args.bin", "rng_state.pth",
)  # fmt: skip


@dataclass(frozen=True)
class PushFile:
    path_in_repo: str
    size: int
    local: Path | None  # None for what is built in memory: the card, a rewritten config
    content: bytes | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path_in_repo, "size": self.size}


@dataclass
class PushResult:
    repo_id: str
    revision: str
    files: list[PushFile]
    card: str
    dry_run: bool
    private: bool
    commit_url: str | None = None
    commit_oid: str | None = None
    pull_request_url: str | None = None
    changed: bool = False
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "repo_id": self.repo_id,
            "revision": self.revision,
            "private": self.private,
            "dry_run": self.dry_run,
            "files": [f.to_dict() for f in self.files],
            "commit_url": self.commit_url,
            "commit_oid": self.commit_oid,
            "pull_request_url": self.pull_request_url,
            "changed": self.changed,
            "card": self.card,
            "warnings": list(self.warnings),
        }


def _check_repo_id(repo_id: str) -> None:
    if "/" not in repo_id or not valid_repo_id(repo_id):
        raise InvalidOptionError(
            f"`{repo_id}` is not a Hub repo id", hint="use OWNER/NAME, e.g. alice/my-adapter"
        )


def _base_model(configs: list[LoraConfig], override: str | None) -> str:
    """The card's base model: `--base-model`, else the one Hub id the adapters' configs name."""
    if override is not None:  # said to be a Hub id: a local folder of that name does not matter
        if not valid_repo_id(override):
            raise InvalidOptionError(
                f"--base-model `{override}` is not a Hub repo id",
                hint="the card links the base model on the Hub: pass OWNER/NAME",
            )
        return override
    names = [c.base_model_name_or_path for c in configs]
    ids = sorted({str(n) for n in names if hub_id(n) is not None})
    if len(ids) > 1:
        raise AdapterctlError(
            f"the adapters name different base models ({', '.join(ids)})",
            hint="push them to separate repos, or pass --base-model OWNER/NAME",
        )
    if ids:
        return ids[0]
    local = next((n for n in names if n), None)
    if local:
        raise AdapterctlError(
            f"the adapter's base model is the local path `{local}`, which means nothing on the Hub",
            hint="pass --base-model OWNER/NAME, the Hub id of that base model",
        )
    raise AdapterctlError(
        "the adapter's config names no base model", hint="pass --base-model OWNER/NAME"
    )


def _remote_card(repo_id: str, revision: str, token: str | None) -> bytes | None:
    """The repo's README.md at `revision` (a commit id), or None when it has none. Any other
    failure (the Hub not reachable, say) is an error: pushing on would replace the card without
    its tags."""
    from huggingface_hub import errors, hf_hub_download

    with hub_errors(repo_id, revision=revision, path=README_NAME):
        try:
            path = hf_hub_download(
                repo_id, README_NAME, revision=revision, token=token, endpoint=endpoint()
            )
        except errors.LocalEntryNotFoundError:  # the Hub did not answer: mapped to an error
            raise
        except errors.EntryNotFoundError:  # the Hub answered: no such file
            return None
    return read_small(path, "model card")  # decoded in with_card: bad bytes are an error line


def _encoding_only(message: str, config: LoraConfig) -> bool:
    problem = config.encoding_problem
    return problem is not None and message.startswith(problem)


def _is_trainer_checkpoint(directory: Path | None) -> bool:
    return directory is not None and any((directory / n).exists() for n in TRAINER_FILES)


def plan_push(
    source: str | os.PathLike[str],
    adapters: list[str] | None = None,
    base_model: str | None = None,
    repo_id: str | None = None,
) -> tuple[list[PushFile], LoraConfig, list[str], dict[str, LoraConfig]]:
    """The adapter files to upload, after the same checks as `inspect --check`; the config the
    card describes (with the base model's Hub id); what the user should be told; and each chosen
    adapter's config by name, for the card's adapter facts."""
    root = Path(source)
    if not os.path.lexists(root):
        raise AdapterNotFoundError(
            f"`{os.fspath(source)}` does not exist", hint="push uploads a local PEFT directory"
        )
    if not root.is_dir():
        raise AdapterctlError(
            f"`{source}` is not an adapter directory", hint="push uploads a PEFT directory"
        )
    found = find_adapters(root)
    notes: list[str] = []
    if adapters:
        picked = pick_adapters(found, adapters, source)
    else:
        checkpoints = [
            a for a in found if a.directory != root and _is_trainer_checkpoint(a.directory)
        ]
        picked = [a for a in found if a not in checkpoints]
        if not picked:
            raise AdapterctlError(
                f"`{source}` holds only Trainer checkpoints ({', '.join(a.name for a in checkpoints)})",
                hint=f"push one folder, e.g. `adapterctl push {root / checkpoints[0].name} REPO_ID`",
            )
        if checkpoints:
            notes.append(
                f"left out {len(checkpoints)} Trainer checkpoint folder(s) "
                f"({', '.join(a.name for a in checkpoints)}); choose one with --adapter NAME"
            )
    configs = []
    for adapter in picked:  # every chosen adapter passes the check before anything else
        assert adapter.config_path is not None
        for path in (adapter.config_path, adapter.weights_path):
            check_inside(path, root)  # what is uploaded never links out of SOURCE
        report = report_adapter(adapter)
        config = LoraConfig.from_file(adapter.config_path)
        # a config PEFT cannot read for its encoding alone is uploaded re-encoded (below)
        errors = [p for p in report.errors if not _encoding_only(p.message, config)]
        if errors:
            raise AdapterctlError(
                f"`{report.path}` fails the check: {errors[0].message}",
                hint=f"run `adapterctl inspect {source} --check` for the whole report",
            )
        configs.append(config)
        variants = variants_in(config)
        if variants:  # a copy is fine; say what the Hub's readers will need
            notes.append(f"`{report.path}`: {variant_message(variants)}; it is uploaded as is")
    hub_base = _base_model(configs, base_model)
    files: list[PushFile] = []
    for adapter, config in zip(picked, configs, strict=True):
        assert adapter.config_path is not None
        sub = adapter_subdir(adapter.name) if adapter.directory != root else ""
        weights = SAFETENSORS_NAME if adapter.format == "safetensors" else BIN_NAME
        config_in_repo = f"{sub}/{CONFIG_NAME}" if sub else CONFIG_NAME
        if config.base_model_name_or_path != hub_base or config.encoding_problem:
            # what PEFT's AutoPeftModel reads from the repo must name the base on the Hub
            raw = read_small(adapter.config_path, "adapter config")
            text = edited_json(raw, base_model_name_or_path=hub_base).encode()
            files.append(PushFile(config_in_repo, len(text), None, text))
            if config.encoding_problem:
                notes.append(
                    f"`{config_in_repo}` is uploaded as UTF-8 without a BOM (PEFT reads only "
                    "that; the local file is not changed)"
                )
            named = config.base_model_name_or_path
            if named and named != hub_base:  # filling in a missing name needs no word
                notes.append(
                    f"`{config_in_repo}` is uploaded naming base model `{hub_base}` (the local "
                    f"file names `{config.base_model_name_or_path}`)"
                )
        else:
            size = adapter.config_path.stat().st_size
            files.append(PushFile(config_in_repo, size, adapter.config_path))
        local = adapter.weights_path
        files.append(PushFile(f"{sub}/{weights}" if sub else weights, local.stat().st_size, local))
    first = next(
        (c for a, c in zip(picked, configs, strict=True) if a.name == DEFAULT_ADAPTER), configs[0]
    )
    facts = {
        a.name: c.replace(base_model_name_or_path=hub_base)
        for a, c in zip(picked, configs, strict=True)
    }
    written = f"the card push uploads to `{repo_id}`" if repo_id else "the card push uploads"
    note = facts_note(read_card(root), facts, written, f"`{root / README_NAME}`")
    if note:
        notes.append(note)
    return files, first.replace(base_model_name_or_path=hub_base), notes, facts


def with_card(
    files: list[PushFile],
    config: LoraConfig,
    source: str | os.PathLike[str],
    remote: bytes | None,
    adapters: dict[str, LoraConfig] | None = None,
) -> tuple[list[PushFile], str]:
    """`files` and the card: SOURCE's own card (or a new one), with the repo's card's tags too,
    its adapter facts rewritten for `adapters` (name -> config) and no local base model in it."""
    local = Path(source) / README_NAME
    where = "the repo's README.md"
    try:
        text = remote.decode("utf-8") if remote is not None else None
    except UnicodeDecodeError as e:
        raise CardError(
            f"{where} is not a model card adapterctl can update: it is not UTF-8 ({e.reason})",
            hint="fix its front matter (YAML between --- lines) or remove it",
        ) from e
    tags = card_tags(text, where)
    card = card_text(
        config,
        read_card(Path(source)),
        tags,
        config.base_model_name_or_path,
        adapters=adapters,
        label=f"`{local}`",
    )
    data = card.encode("utf-8")
    return [*files, PushFile(README_NAME, len(data), None, data)], card


def push_adapter(
    source: str | os.PathLike[str],
    repo_id: str,
    *,
    adapters: list[str] | None = None,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    base_model: str | None = None,
    token: str | None = None,
    dry_run: bool = False,
) -> PushResult:
    """Check the adapter, build its card and upload it in one commit (nothing with `dry_run`)."""
    _check_repo_id(repo_id)
    branch = revision or "main"
    adapter_files, config, notes, facts = plan_push(
        source, adapters, base_model, repo_id
    )  # no network
    for note in notes:
        log.warning("%s", note)
    if dry_run:
        files, card = with_card(adapter_files, config, source, None, facts)
        return PushResult(repo_id, branch, files, card, True, private, warnings=notes)
    hf = api(token)
    with hub_errors(repo_id, revision=revision, action="write to"):
        hf.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main" and not revision.startswith("refs/pr/"):
            hf.create_branch(repo_id, branch=revision, exist_ok=True)
        info = hf.repo_info(repo_id, revision=branch)
    before, private = info.sha, bool(info.private)  # an existing repo keeps its visibility
    # the card is read at the very commit the push is made on (never a cached other one)
    remote = _remote_card(repo_id, before, token)
    files, card = with_card(adapter_files, config, source, remote, facts)
    from huggingface_hub import CommitOperationAdd

    operations = [CommitOperationAdd(f.path_in_repo, f.local or f.content or b"") for f in files]
    message = commit_message or f"Upload adapter with adapterctl ({len(files)} files)"
    with hub_errors(repo_id, revision=revision, action="upload to"):
        info = hf.create_commit(
            repo_id,
            operations,
            commit_message=message,
            revision=branch,
            create_pr=create_pr,
            parent_commit=before,  # a commit that landed since repo_info is never overwritten
        )
    result = PushResult(repo_id, branch, files, card, False, private, warnings=notes)
    result.commit_url, result.commit_oid = info.commit_url, info.oid
    result.pull_request_url = info.pr_url
    result.changed = info.oid != before
    return result
