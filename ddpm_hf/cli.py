"""The `ddpm-hf` command: work with saved DDPM pipelines (a training run's output folder) from the shell.

    ddpm-hf sample MODEL [--num-images N] [--batch-size B] [--steps S] [--seed X] [--out DIR_OR_GRID] [--gif ...]
    ddpm-hf evaluate MODEL --reference ... [--num-samples N]
    ddpm-hf sweep MODEL [--samplers ddpm,dpm-solver,...] [--steps 5,10,...] [--out DIR] [--save]
    ddpm-hf noise IMAGE [--out STRIP]
    ddpm-hf push OUTPUT_DIR REPO_ID [--private] [--token TOKEN] [--commit-message MESSAGE] [--revision BRANCH]
    ddpm-hf card OUTPUT_DIR [--repo-id REPO_ID] [--force]

Each subcommand is an `add_<name>_command(subparsers)` function that declares its arguments and the
function that runs it; register new ones in `SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

from .commands import add_evaluate_command, add_noise_command, add_sample_command, add_sweep_command
from .hub import HubPushError, check_saved_pipeline, is_generated_card, push_to_hub, write_model_card
from .hub.card import CARD_NAME


def add_push_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "push",
        help="upload a saved pipeline, its model card and sample images to the Hub",
        description="Upload model_index.json, unet/ and scheduler/ (safetensors), README.md and the sample images "
                    "of OUTPUT_DIR to a Hub repo, creating it if needed. Checkpoints, optimizer states, logs and "
                    "training arguments are never uploaded. The model card is regenerated first.",
    )
    parser.add_argument("output_dir", type=Path, metavar="OUTPUT_DIR", help="a training run's --output_dir, or any "
                        "folder written by save_pretrained")
    parser.add_argument("repo_id", metavar="REPO_ID", help='the Hub repo, "user/name" or "org/name"')
    parser.add_argument("--private", action="store_true", help="create the repo as private (if it does not exist)")
    parser.add_argument("--token", help="a token with write access (default: HF_TOKEN, then the `hf auth login` one); "
                        "prefer HF_TOKEN, as a flag shows up in shell history and process lists")
    parser.add_argument("--commit-message", metavar="MESSAGE",
                        help='the commit message (default: "Upload DDPM pipeline")')
    parser.add_argument("--revision", metavar="BRANCH", help="the branch to push to, created if needed (default: main)")
    parser.set_defaults(run=run_push)


def run_push(args: argparse.Namespace) -> None:
    commit = push_to_hub(args.output_dir, args.repo_id, private=args.private or None, token=args.token,
                         commit_message=args.commit_message, revision=args.revision)
    print(f"Pushed {args.output_dir} to {commit.repo_url} (commit {commit.oid[:8]}).")


def add_card_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "card",
        help="write the model card (README.md) of a saved pipeline",
        description="Render OUTPUT_DIR/README.md from the pipeline, the run's training_config.json and "
                    "eval_results.json, and the sample images beside them.",
    )
    parser.add_argument("output_dir", type=Path, metavar="OUTPUT_DIR", help="a training run's --output_dir, or any "
                        "folder written by save_pretrained")
    parser.add_argument("--repo-id", metavar="REPO_ID", help="the Hub repo the card's usage snippets load "
                        "(default: the run's --hub_model_id, else your-username/<folder name>)")
    parser.add_argument("--force", action="store_true", help="replace a README.md that was written by hand")
    parser.set_defaults(run=run_card)


def run_card(args: argparse.Namespace) -> None:
    check_saved_pipeline(args.output_dir)
    existing = args.output_dir / CARD_NAME
    if existing.is_file() and not args.force and not is_generated_card(existing):
        raise ValueError(f"{existing} was written by hand; pass --force to replace it.")
    path = write_model_card(args.output_dir, args.repo_id, overwrite=args.force)
    print(f"Wrote {path}.")


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_sample_command, add_evaluate_command, add_sweep_command, add_noise_command, add_push_command, add_card_command,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddpm-hf", description="Work with saved DDPM pipelines: sample and "
                                     "evaluate them, find their fastest sampler, push them to the Hugging Face Hub, "
                                     "write their model cards.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in SUBCOMMANDS:
        add_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `ddpm-hf` with `argv` (default: the command line); returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError, HubPushError) as error:  # OSError: a missing file (weights, folder, image)
        print(f"ddpm-hf {args.command}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
