"""The naive baseline server: what a user would write from transformers' documentation.

One request at a time (a one-thread executor, so the event loop still reads bodies and answers
``/readyz``), plain ``BlipProcessor`` on the PIL-decoded image, ``model.generate`` on a batch of one,
the same aiohttp framework as ``captionfleet serve``. Same model files and generation options as ours
(``num_beams``, ``max_new_tokens``; the model's generation config applies to both). No cache, no
batching, no draft decoding. Run: ``python -m captionfleet.bench.baseline --model DIR --port 8090``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiohttp import web

log = logging.getLogger("captionfleet.bench.baseline")


def load_naive_captioner(model_dir: Path, num_beams: int, max_new_tokens: int) -> Callable[[bytes], str]:
    """The textbook captioning function: bytes -> PIL -> BlipProcessor -> generate -> decode."""
    import torch
    from PIL import Image
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor = BlipProcessor.from_pretrained(model_dir)
    model = BlipForConditionalGeneration.from_pretrained(model_dir)
    model.train(False)

    def caption(data: bytes) -> str:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        inputs = processor(images=image, return_tensors="pt")
        with torch.inference_mode():
            output = model.generate(**inputs, num_beams=num_beams, max_new_tokens=max_new_tokens)
        text = processor.decode(output[0], skip_special_tokens=True)  # type: ignore[no-untyped-call]
        return str(text).strip()

    return caption


def build_app(caption: Callable[[bytes], str]) -> web.Application:
    model_thread = ThreadPoolExecutor(1, thread_name_prefix="model")  # one request at a time

    async def handle_caption(request: web.Request) -> web.StreamResponse:
        from PIL import UnidentifiedImageError

        body = await request.read()
        started = time.perf_counter()
        try:
            text = await asyncio.get_running_loop().run_in_executor(model_thread, caption, body)
        except UnidentifiedImageError as exc:
            error = {"code": "unsupported_media_type", "message": str(exc)}
            return web.json_response({"error": error, "request_id": ""}, status=415)
        latency_ms = (time.perf_counter() - started) * 1000
        return web.json_response({"caption": text, "cached": False, "latency_ms": latency_ms})

    async def ready(request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "ready"})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/caption", handle_caption)
    app.router.add_get("/readyz", ready)
    app.router.add_get("/healthz", ready)
    return app


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m captionfleet.bench.baseline", description=__doc__)
    parser.add_argument("--model", required=True, help="save_pretrained directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.torch_threads > 0:
        import torch

        torch.set_num_threads(args.torch_threads)
    caption = load_naive_captioner(Path(args.model), args.num_beams, args.max_new_tokens)
    caption(_warmup_jpeg())  # as captionfleet serve does before /readyz says yes
    log.info("listening on %s:%d", args.host, args.port)
    # aiohttp's access log stays on, as a default setup has it (ours logs each request too).
    web.run_app(build_app(caption), host=args.host, port=args.port, print=None)
    return 0


def _warmup_jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (127, 127, 127)).save(buffer, "JPEG")
    return buffer.getvalue()


if __name__ == "__main__":
    raise SystemExit(main())
