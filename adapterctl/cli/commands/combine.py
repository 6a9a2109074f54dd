"""`adapterctl combine`: several adapters into one, from their files alone."""

from __future__ import annotations

from typing import Annotated

import typer

from adapterctl.cli.options import ForceOpt, JsonOpt, TokenOpt
from adapterctl.cli.output import Output, render_combine


def _weights(text: str) -> list[float]:
    try:
        return [float(w) for w in text.split(",")]
    except ValueError as e:
        raise typer.BadParameter(
            f"{text!r} is not a comma-separated list of numbers (e.g. 1,0.5)",
            param_hint="'--weights'",
        ) from e


def combine_cmd(
    sources: Annotated[
        list[str],
        typer.Argument(
            metavar="SOURCE",
            help="The adapters to combine: a directory, DIR/NAME for an adapter of a "
            "multi-adapter directory, a weights file or a Hub repo id.",
            show_default=False,
        ),
    ],
    output: Annotated[
        str,
        typer.Argument(
            metavar="OUTPUT",
            help="The directory to write (must not exist unless --force).",
            show_default=False,
        ),
    ],
    weights: Annotated[
        str,
        typer.Option(
            "--weights",
            metavar="W1,W2,...",
            help="One weight per SOURCE, in order (negative subtracts).",
            show_default=False,
        ),
    ],
    method: Annotated[
        str,
        typer.Option(
            "--method",
            metavar="METHOD",
            help="cat (exact), svd, linear, ties, ties_svd, dare_linear, dare_ties, "
            "dare_linear_svd, dare_ties_svd, magnitude_prune or magnitude_prune_svd "
            "(PEFT's add_weighted_adapter).",
            show_default=False,
        ),
    ],
    density: Annotated[
        float | None,
        typer.Option(
            "--density",
            metavar="D",
            help="ties, dare and magnitude_prune methods: the fraction of values kept, in (0, 1].",
            show_default=False,
        ),
    ] = None,
    majority_sign_method: Annotated[
        str,
        typer.Option(
            "--majority-sign-method",
            metavar="total|frequency",
            help="ties and dare_ties methods: how the sign of each value is elected.",
        ),
    ] = "total",
    rank: Annotated[
        int | None,
        typer.Option(
            "--rank",
            metavar="N",
            help="svd methods: the output rank (default: the largest r or rank_pattern value "
            "of the sources, as PEFT).",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option("--seed", metavar="S", help="dare methods: the seed of the masks.")
    ] = 0,
    verify: Annotated[
        bool,
        typer.Option("--verify", help="Check every module's delta in float64 before renaming."),
    ] = False,
    token: TokenOpt = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Combine several adapters into one, without the base model.

    The methods and meanings of PEFT's add_weighted_adapter; cat and svd are exact (svd up to
    its rank cut) for any mix of ranks, alphas, rank/alpha patterns and rslora, where PEFT
    applies only one scaling. torch is not imported for safetensors sources.
    """
    from adapterctl.ops.combine import VerificationFailed, combine

    out = Output(json_)
    with (
        out.failure_document(VerificationFailed, lambda e: e.result.to_dict()),
        out.progress("combining") as advance,
    ):
        result = combine(
            sources,
            output,
            weights=_weights(weights),
            method=method,
            density=density,
            majority_sign_method=majority_sign_method,
            rank=rank,
            seed=seed,
            verify=verify,
            force=force,
            progress=advance,
            token=token,
        )
    out.result(result, render_combine)
