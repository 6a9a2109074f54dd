"""`adapterctl push`: publish an adapter to a Hub repo with a correct model card."""

from __future__ import annotations

from typing import Annotated

import typer

from adapterctl.cli.options import JsonOpt, TokenOpt
from adapterctl.cli.output import Output, render_push


def push_cmd(
    source: Annotated[
        str,
        typer.Argument(metavar="SOURCE", help="The adapter directory.", show_default=False),
    ],
    repo_id: Annotated[
        str,
        typer.Argument(metavar="REPO_ID", help="The Hub repo, OWNER/NAME.", show_default=False),
    ],
    adapter: Annotated[
        list[str] | None,
        typer.Option(
            "--adapter",
            "-a",
            metavar="NAME",
            help="Only these adapters of a multi-adapter directory (repeat).",
            show_default=False,
        ),
    ] = None,
    private: Annotated[
        bool, typer.Option("--private", help="Create the repo private (if it is new).")
    ] = False,
    revision: Annotated[
        str | None,
        typer.Option(
            "--revision",
            metavar="BRANCH",
            help="Push to this branch (created from main).",
            show_default=False,
        ),
    ] = None,
    create_pr: Annotated[
        bool, typer.Option("--create-pr", help="Open a pull request instead of committing.")
    ] = False,
    commit_message: Annotated[
        str | None,
        typer.Option(
            "--commit-message", metavar="MSG", help="The commit message.", show_default=False
        ),
    ] = None,
    base_model: Annotated[
        str | None,
        typer.Option(
            "--base-model",
            metavar="ID",
            help="The base model's Hub id for the card.",
            show_default=False,
        ),
    ] = None,
    token: TokenOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the files and the card; upload nothing.")
    ] = False,
    json_: JsonOpt = False,
) -> None:
    """Upload an adapter to the Hugging Face Hub with a model card, after `inspect --check`.

    Only the adapter files go up (configs, weights and the card), never anything else in the
    folder, which is left untouched. Pushing identical files again makes no commit.
    """
    from adapterctl.ops.push import push_adapter

    # No spinner here: huggingface_hub draws its own upload bars on stderr, and a rich spinner
    # would capture stderr under it and break them.
    result = push_adapter(
        source,
        repo_id,
        adapters=adapter or None,
        private=private,
        revision=revision,
        create_pr=create_pr,
        commit_message=commit_message,
        base_model=base_model,
        token=token,
        dry_run=dry_run,
    )
    Output(json_).result(result, render_push)
