"""Loading a BLIP captioning model: source resolution, device and dtype choice, and its version string.

Sources: a local directory in ``save_pretrained`` format (plain path or ``file://`` URL) or a Hugging
Face id such as ``Salesforce/blip-image-captioning-base`` (needs a reachable hub or a warm cache; the
error says so otherwise).

Version string, first that applies:
1. the ``version`` argument (e.g. the CaptionModel's ``versions[].name``);
2. ``"version"`` in a ``captionfleet.json`` next to the weights (written by ``captionfleet train``);
3. local directory: ``<dir name>-<first 12 hex of sha256 over config.json and the weight files>``,
   so retrained weights in the same folder get a new version;
4. hub id: ``<id>@<first 12 hex of the resolved commit>``, or the id alone when unknown.

A directory's ``ood_reference.safetensors`` (``ood.py``), when there, is loaded as the model's
out-of-distribution reference; it is left out of the version hash.

Precision ``int8`` (CPU only): the weights load in fp32, then every ``nn.Linear`` is replaced by its
dynamically quantised version (``torch.ao.quantization.quantize_dynamic``: int8 weights, activations
quantised per batch on the fly); the patch-embedding convolution, layer norms and embeddings stay fp32.
On CUDA those kernels do not exist, so ``int8`` there is a :class:`ModelLoadError`.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

import torch

from captionfleet.calibration import CALIBRATION_FILE
from captionfleet.runtime.engine.errors import ModelLoadError
from captionfleet.runtime.engine.ood import REFERENCE_FILE, OodReference
from captionfleet.runtime.engine.preprocess import ImagePreprocessor
from captionfleet.runtime.engine.types import DEFAULT_MODEL

if TYPE_CHECKING:
    from captionfleet.runtime.engine.captioner import Captioner

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
MANIFEST = "captionfleet.json"
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
INT8 = "int8"
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def bundled_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """The bundled model ``name``: its folder in ``runtime/models/`` (a save_pretrained folder)."""
    directory = MODELS_DIR / name
    if not (directory / "config.json").is_file():
        found = ", ".join(path.name for path in bundled_model_dirs()) or "none"
        raise ModelLoadError(
            f"no bundled model {name!r} in {MODELS_DIR} (found: {found}; `captionfleet train` builds it)"
        )
    return directory


def bundled_model_dirs() -> list[Path]:
    """Every bundled model's folder, by name."""
    # Hidden folders are a training run's staging folders (bundle.staging_dir), not models yet.
    folders = (path.parent for path in MODELS_DIR.glob("*/config.json"))
    return sorted(folder for folder in folders if not folder.name.startswith("."))


def read_calibration(directory: Path) -> dict[str, Any] | None:
    """The folder's ``calibration.json`` (a cascade's calibration of this model as its fast tier), or
    ``None`` without one; a file that is not a JSON object is a :class:`ModelLoadError`."""
    path = directory / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(found, dict) or not isinstance(found.get("rows"), list):
        raise ModelLoadError(f"{path}: expected a JSON object with a 'rows' list")
    return found


def resolve_source(source: str) -> Path | str:
    """A local directory (``Path``) or a hub id (``str``); raises :class:`ModelLoadError` otherwise."""
    text = source.strip()
    if text.startswith("file:"):
        parsed = urlparse(text)
        path = Path(unquote(parsed.netloc + parsed.path)).expanduser()
        if not path.is_dir():
            raise ModelLoadError(f"model directory {path} (from {source!r}) does not exist")
        return path
    path = Path(text).expanduser()
    if path.is_dir():
        return path.resolve()
    if text.startswith((".", "/", "~")) or not _HUB_ID.match(text):
        raise ModelLoadError(f"model directory {text!r} does not exist (and it is not a Hugging Face id)")
    return text


def pick_device(device: str | None) -> torch.device:
    """The requested device, else CUDA when available, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"unknown device {device!r}: {exc}") from exc
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
    return chosen


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """The requested dtype; by default bf16 on CUDA (fp16 where bf16 is unsupported), fp32 on CPU."""
    if dtype is not None and dtype.lower() == INT8:
        if device.type != "cpu":
            raise ModelLoadError(
                f"precision int8 (dynamic quantisation) runs on the CPU only, not on {device}; "
                "use bf16 or fp16 on a GPU"
            )
        return torch.float32  # the weights load in fp32 and are quantised after loading
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        names = ", ".join(sorted([*_DTYPES, INT8]))
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {names}") from None


def read_manifest(model_dir: Path) -> dict[str, Any]:
    """``captionfleet.json`` next to the weights, or ``{}``."""
    path = model_dir / MANIFEST
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}


def content_hash(model_dir: Path) -> str:
    """sha256 over config.json and the weight files (names and bytes), in name order."""
    digest = hashlib.sha256()
    files = [model_dir / "config.json"]
    for pattern in _WEIGHT_PATTERNS:
        # The OOD reference describes the inputs, not the weights: rewriting it keeps the version.
        files.extend(sorted(path for path in model_dir.glob(pattern) if path.name != REFERENCE_FILE))
    for path in files:
        if path.is_file():
            digest.update(path.name.encode())
            with open(path, "rb") as handle:
                digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


def model_identity(location: Path | str, model: Any) -> tuple[str, str]:
    """(model name, version) for a loaded model; see the module docstring for the rules."""
    if isinstance(location, Path):
        manifest = read_manifest(location)
        name = str(manifest.get("name") or location.name)
        version = manifest.get("version")
        if version:
            return name, str(version)
        return name, f"{location.name}-{content_hash(location)[:12]}"
    commit = getattr(model.config, "_commit_hash", None)
    return location, f"{location}@{commit[:12]}" if commit else location


def quantize_int8(model: Any) -> Any:
    """``model`` with its linear layers dynamically quantised to int8 (CPU inference only)."""
    import warnings

    from torch.ao.quantization import quantize_dynamic

    # torch.ao's eager quantisation is deprecated in favour of torchao, whose CPU int8 path needs
    # torch.compile to be fast; this one still ships with torch, needs no compiler and is measured fast.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)  # type: ignore[no-untyped-call]


def load_captioner(
    source: str,
    *,
    device: str | None = None,
    dtype: str | None = None,
    version: str | None = None,
    decoder: str | None = None,
    cuda_graphs: bool = False,
) -> Captioner:
    """Load model, tokenizer and preprocessor from ``source`` into eval mode on the chosen device.

    ``decoder``: ``native`` (the default) or ``transformers`` (see ``captioner.py``; ``serve`` passes
    its ``--decoder``, which the CRD's ``versions[].decoder`` sets). ``cuda_graphs`` replays the native
    decoder's steps as CUDA graphs (CUDA only; ignored elsewhere)."""
    from transformers import AutoTokenizer, BlipForConditionalGeneration, BlipImageProcessorPil

    from captionfleet.runtime.engine.captioner import Captioner

    location = resolve_source(source)
    chosen_device = pick_device(device)
    chosen_dtype = pick_dtype(dtype, chosen_device)
    try:
        model = BlipForConditionalGeneration.from_pretrained(location, dtype=chosen_dtype)
        tokenizer = AutoTokenizer.from_pretrained(location)
        if isinstance(location, Path):
            preprocessor = ImagePreprocessor.from_pretrained(location)
        else:
            config, _ = BlipImageProcessorPil.get_image_processor_dict(location)
            preprocessor = ImagePreprocessor.from_config(config)
    except (OSError, ValueError) as exc:
        if isinstance(location, Path):
            raise ModelLoadError(f"could not load a BLIP model from {location}: {exc}") from exc
        raise ModelLoadError(
            f"could not load {location!r} from the Hugging Face Hub (is a hub reachable, or the model "
            f"in the local cache? A local directory in save_pretrained format also works): {exc}"
        ) from exc
    model = model.to(chosen_device)  # type: ignore[arg-type]  # transformers' stub wraps .to oddly
    model.train(False)  # eval mode: no dropout
    model.requires_grad_(False)
    int8 = dtype is not None and dtype.lower() == INT8
    if int8:
        model = quantize_int8(model)
    name, default_version = model_identity(location, model)
    reference = OodReference.load(location) if isinstance(location, Path) else None
    calibration = read_calibration(location) if isinstance(location, Path) else None
    return Captioner(
        model,
        tokenizer,
        preprocessor,
        version=version or default_version,
        model_name=name,
        device=chosen_device,
        dtype=chosen_dtype,
        source=str(location),
        decoder=decoder or "native",
        cuda_graphs=cuda_graphs,
        precision=INT8 if int8 else "",
        reference=reference,
        calibration=calibration,
    )
