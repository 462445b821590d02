"""`captionfleet train` and `captionfleet eval` refuse options that do not hold together, naming them."""

from __future__ import annotations

import re

import pytest

from captionfleet.cli import main

EVAL = ["eval", "--progress", "false"]
BAD_OPTIONS = {
    "eval images without captions": ([*EVAL, "--images", "somewhere"], "--images and --captions go together"),
    "eval no scenes": ([*EVAL, "--scenes", "0"], "--scenes must be at least 1"),
    "eval no beams": ([*EVAL, "--num-beams", "0"], "--num-beams must be at least 1"),
    "eval missing model": ([*EVAL, "--model", "/no/such/model"], "does not exist"),
    "train no steps": (["train", "--steps", "0"], "--steps must be at least 1"),
    "train image size": (["train", "--image-size", "100"], "multiple of --patch-size"),
    "train eval seed": (["train", "--eval-seed", "0"], "--eval-seed must differ"),
    "train prompt fraction": (["train", "--prompt-fraction", "1.5"], "--prompt-fraction"),
    "train heads": (
        ["train", "--text-hidden", "30", "--text-heads", "4"],
        "--text-hidden must be a multiple",
    ),
    "train reference scenes": (
        ["train", "--reference-scenes", "5"],
        "--reference-scenes must be 0 or at least 30",
    ),
}


@pytest.mark.parametrize(("argv", "message"), list(BAD_OPTIONS.values()), ids=list(BAD_OPTIONS))
def test_train_and_eval_commands_reject_bad_options(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=re.escape(message)):
        main(argv)
