"""GPU benchmark: BLIP-base with random weights, the naive path vs our batched path, in one run.

    python -m captionfleet.bench.gpu            # on a CUDA machine; about 7 minutes at most
    python -m captionfleet.bench.gpu --tiny     # a tiny model on whatever device there is (smoke test)

Needs only torch and transformers (no internet, no weights: the model is randomly initialised in bf16,
and every caption is exactly ``--tokens`` long through ``min_new_tokens = max_new_tokens``). Inputs
are random pixel tensors already on the device, so this measures the model side only; preprocessing
is ``captionfleet bench``'s part.

- naive: one image per ``model.generate`` call, decoded to text, as a one-at-a-time server does;
- batched: ``Captioner.caption_pixels`` on a batch of B images with transformers' ``generate`` as the
  decoder, the call our dynamic batcher makes per batch (beam scores, confidences and suggestions
  included);
- native: the same call with captionfleet's own decoder (``runtime/engine/decoder.py``);
- graphs: the native decoder with each step replayed as a CUDA graph (static shapes); on a CPU it runs
  the same static-shaped step eagerly.

For greedy decoding and beam search (3 beams) it prints images per second, and p50/p99 of the time
from the start of the call that produced an image's caption to its end (queueing not included).
Every cell gets a share of ``--budget-s``; cells that would not fit are reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from captionfleet.bench.models import BLIP_BASE, BLIP_TINY, BlipSpec, build_model, build_tokenizer

MODES = {"greedy": 1, "beam3": 3}
"""Decoding modes and their beam widths."""

BATCHED = ("batched", "native", "graphs")
"""The batched paths: Captioner with transformers' generate, with the native decoder, with CUDA graphs."""

CaptionCall = Callable[[Any, int], list[str]]
"""(pixel batch, beams) -> one caption per image."""


@dataclass
class Cell:
    mode: str
    path: str
    batch: int
    images: int = 0
    seconds: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    status: str = "ok"

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.latencies_s)
        return {
            "mode": self.mode,
            "path": self.path,
            "batch": self.batch,
            "images": self.images,
            "images_per_s": round(self.images / self.seconds, 2) if self.seconds > 0 else None,
            "p50_ms": _percentile_ms(ordered, 50),
            "p99_ms": _percentile_ms(ordered, 99),
            "status": self.status,
        }


def _percentile_ms(ordered: Sequence[float], q: float) -> float | None:
    if not ordered:
        return None
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return round((ordered[low] + (ordered[high] - ordered[low]) * (rank - low)) * 1000, 2)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m captionfleet.bench.gpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--tiny", action="store_true", help="tiny model, batches 1 and 4, 4 tokens")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--device", default="auto", help="cuda, cuda:1, cpu; auto: CUDA when available")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "bf16", "fp16", "fp32"),
        help="auto: bf16 on CUDA, fp32 on the CPU",
    )
    parser.add_argument("--tokens", type=int, default=0, help="tokens per caption (0: 20, 4 with --tiny)")
    parser.add_argument("--batch-sizes", default="", help="comma-separated (default 1,8,32,64,128,256)")
    parser.add_argument("--naive-images", type=int, default=64, help="most images per naive cell")
    parser.add_argument("--batches", type=int, default=5, help="most batches per batched cell")
    parser.add_argument(
        "--budget-s", type=float, default=0.0, help="seconds for all cells together (0: 400, 60 with --tiny)"
    )
    return parser.parse_args(argv)


def run_plan(
    paths: dict[str, Any],
    pixels: Any,
    batch_sizes: list[int],
    args: argparse.Namespace,
    ends: float,
    synchronize: Callable[[], None],
    oom: tuple[type[BaseException], ...],
) -> list[Cell]:
    """Every cell: each mode on the naive path at batch 1, and on every batched path at every size; each
    cell gets an equal share of the time that is left."""
    plan = [(mode, "naive", 1) for mode in MODES]
    plan += [(mode, path, size) for mode in MODES for path in BATCHED for size in batch_sizes]
    cells: list[Cell] = []
    for mode, path, size in plan:
        print(f"[gpu] {mode} {path} batch {size}", file=sys.stderr, flush=True)
        share_s = (ends - time.monotonic()) / (len(plan) - len(cells))
        repeats = args.naive_images if path == "naive" else args.batches
        cell = Cell(mode, path, size)
        run_cell(cell, paths[path][0], pixels[:size], MODES[mode], repeats, share_s, synchronize, oom)
        cells.append(cell)
    return cells


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch
    import transformers

    started = time.monotonic()
    auto_device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto_device if args.device == "auto" else args.device)
    dtype_name = args.dtype if args.dtype != "auto" else "bf16" if device.type == "cuda" else "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    spec = BLIP_TINY if args.tiny else BLIP_BASE
    tokens = args.tokens or (4 if args.tiny else 20)
    default_sizes = [1, 4] if args.tiny else [1, 8, 32, 64, 128, 256]
    batch_sizes = [int(size) for size in args.batch_sizes.split(",") if size] or default_sizes
    budget_s = args.budget_s or (60.0 if args.tiny else 400.0)

    torch.manual_seed(0)
    tokenizer = build_tokenizer(spec)
    with torch.device(device):  # initialise the weights where they will run: fast on a GPU
        model = build_model(spec, tokenizer, tokens)
    model = model.to(dtype=dtype)
    model.requires_grad_(False)
    paths = {
        "naive": naive_path(model, tokenizer, tokens),
        "batched": batched_path(model, tokenizer, spec, device, dtype, tokens, "transformers"),
        "native": batched_path(model, tokenizer, spec, device, dtype, tokens, "native"),
        "graphs": batched_path(model, tokenizer, spec, device, dtype, tokens, "native", cuda_graphs=True),
    }
    pixels = torch.randn(max(batch_sizes), 3, spec.image_size, spec.image_size, device=device, dtype=dtype)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    cells = run_plan(paths, pixels, batch_sizes, args, started + budget_s, synchronize, oom_errors(torch))
    result = {
        "device": describe_device(torch, device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": spec.describe() + "; random weights",
        "dtype": dtype_name,
        "tokens": tokens,
        "batched_path": paths["batched"][1],
        "paths": {name: description for name, (_, description) in paths.items()},
        "cells": [cell.summary() for cell in cells],
        "best": best_ratios(cells),
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


def describe_device(torch: Any, device: Any) -> str:
    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def naive_path(model: Any, tokenizer: Any, tokens: int) -> tuple[CaptionCall, str]:
    """What a one-at-a-time server runs per request: ``generate`` on its image, then decode."""
    import torch

    def caption(images: Any, beams: int) -> list[str]:
        with torch.inference_mode():
            output = model.generate(pixel_values=images, num_beams=beams, max_new_tokens=tokens)
        return [str(tokenizer.decode(row, skip_special_tokens=True)) for row in output]

    return caption, "model.generate + decode per image"


def oom_errors(torch: Any) -> tuple[type[BaseException], ...]:
    return (torch.cuda.OutOfMemoryError,) if hasattr(torch.cuda, "OutOfMemoryError") else ()


def run_cell(
    cell: Cell,
    call: CaptionCall,
    images: Any,
    beams: int,
    repeats: int,
    share_s: float,
    synchronize: Callable[[], None],
    oom: tuple[type[BaseException], ...],
) -> Cell:
    """A warm-up call, then up to ``repeats`` timed calls while the cell's time share lasts."""
    if share_s <= 0:
        cell.status = "skipped: no time left"
        return cell
    ends = time.monotonic() + share_s
    try:
        warm = time.perf_counter()
        call(images, beams)
        synchronize()
        if time.perf_counter() - warm > share_s:
            cell.status = "skipped: one call takes longer than the cell's time share"
            return cell
        for _ in range(repeats):
            if time.monotonic() > ends:
                break
            begin = time.perf_counter()
            results = call(images, beams)
            synchronize()
            elapsed = time.perf_counter() - begin
            assert len(results) == cell.batch, (len(results), cell.batch)
            cell.images += cell.batch
            cell.seconds += elapsed
            cell.latencies_s += [elapsed] * cell.batch  # every image in the call waited for all of it
    except oom:
        cell.status = "out of memory"
        import torch

        torch.cuda.empty_cache()  # let the next, smaller cells run
    return cell


def batched_path(
    model: Any,
    tokenizer: Any,
    spec: BlipSpec,
    device: Any,
    dtype: Any,
    tokens: int,
    decoder: str,
    *,
    cuda_graphs: bool = False,
) -> tuple[CaptionCall, str]:
    """Our batched call: captionfleet's ``Captioner.caption_pixels`` with the given decoder."""
    from captionfleet.runtime.engine.captioner import Captioner
    from captionfleet.runtime.engine.decoder import BlipDecoder
    from captionfleet.runtime.engine.preprocess import ImagePreprocessor
    from captionfleet.runtime.engine.types import GenerationOptions

    preprocessor = ImagePreprocessor(height=spec.image_size, width=spec.image_size)
    captioner = Captioner(
        model, tokenizer, preprocessor, version="random", model_name=spec.name, device=device, dtype=dtype,
        decoder=decoder, cuda_graphs=cuda_graphs,
    )  # fmt: skip
    if cuda_graphs and device.type != "cuda":  # no graphs to capture: the static-shaped step, eagerly
        captioner._native = BlipDecoder(model, static=True)

    def caption(images: Any, beams: int) -> list[str]:
        options = GenerationOptions(num_beams=beams, max_new_tokens=tokens)
        return [result.text for result in captioner.caption_pixels(images, options)]

    graphs = " + CUDA graphs" if cuda_graphs else ""
    return caption, f"captionfleet Captioner.caption_pixels ({decoder} decoder{graphs})"


def best_ratios(cells: list[Cell]) -> dict[str, Any]:
    """Per mode: the naive rate, the best batched rate (any batched path), its path and batch size,
    their ratio, and the native decoder's best over the transformers-decoded batched path's."""
    best: dict[str, Any] = {}
    for mode in MODES:
        rates = {(c.path, c.batch): c.images / c.seconds for c in cells if c.mode == mode and c.seconds > 0}
        naive = rates.pop(("naive", 1), None)
        if naive is None or not rates:
            continue
        (path, batch), rate = max(rates.items(), key=lambda item: item[1])
        by_path = {
            name: max((r for (p, _), r in rates.items() if p == name), default=0.0) for name in BATCHED
        }
        best[mode] = {
            "naive_images_per_s": round(naive, 2),
            "batched_images_per_s": round(rate, 2),
            "path": path,
            "batch": batch,
            "ratio": round(rate / naive, 2),
            "native_over_generate": round(by_path["native"] / by_path["batched"], 2)
            if by_path["batched"]
            else None,
        }
    return best


def table(result: dict[str, Any]) -> str:
    lines = [
        f"captionfleet GPU bench on {result['device']}: {result['model']}, {result['dtype']}, "
        f"{result['tokens']} tokens; torch {result['torch']}, transformers {result['transformers']}",
        f"batched path: {result['batched_path']}; {result['elapsed_s']} s",
        f"  {'mode':<7} {'path':<8} {'batch':>5} {'images':>6} {'img/s':>9} {'p50 ms':>9} "
        f"{'p99 ms':>9}  status",
    ]
    for cell in result["cells"]:
        values = [cell["images_per_s"], cell["p50_ms"], cell["p99_ms"]]
        shown = ["-" if v is None else f"{v:.1f}" for v in values]
        lines.append(
            f"  {cell['mode']:<7} {cell['path']:<8} {cell['batch']:>5} {cell['images']:>6} "
            f"{shown[0]:>9} {shown[1]:>9} {shown[2]:>9}  {cell['status']}"
        )
    for mode, best in result["best"].items():
        lines.append(
            f"  {mode}: batched x{best['ratio']} the naive rate ({best['batched_images_per_s']} vs "
            f"{best['naive_images_per_s']} img/s, {best['path']} at batch {best['batch']}); native decoder "
            f"x{best['native_over_generate']} transformers' generate"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
