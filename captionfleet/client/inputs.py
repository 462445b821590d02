"""What to caption: image files, folders of them, and text files of image URLs, in the order given."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
URL_SCHEMES = ("http://", "https://")


class InputError(ValueError):
    """An argument that names nothing to caption."""


@dataclass(frozen=True)
class Item:
    """One image: a local file or a URL (which the server fetches, through its SSRF guard)."""

    id: str  # written with its result: the path as given, or the URL
    path: Path | None = None
    url: str | None = None

    def payload_bytes(self) -> int:
        """Its share of a job's JSON body: the file base64-encoded, or the URL, plus the field names."""
        if self.path is not None:
            return 4 * ((self.path.stat().st_size + 2) // 3) + len(self.id) + 64
        return len(self.url or "") + len(self.id) + 64


def collect(sources: Sequence[str]) -> list[Item]:
    """The items of every argument, in order: a folder's images sorted by path (recursively), a
    ``.txt`` file's URLs line by line (``#`` starts a comment), a URL or an image file as itself."""
    items: list[Item] = []
    for source in sources:
        if source.startswith(URL_SCHEMES):
            items.append(Item(source, url=source))
            continue
        path = Path(source)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise InputError(f"{source}: no images in this folder ({', '.join(sorted(IMAGE_SUFFIXES))})")
            items += [Item(str(p), path=p) for p in found]
        elif path.is_file() and path.suffix.lower() == ".txt":
            items += _urls(path)
        elif path.is_file():
            items.append(Item(source, path=path))
        else:
            raise InputError(f"{source}: no such file or folder")
    return items


def _urls(path: Path) -> list[Item]:
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        url = line.split("#", 1)[0].strip()
        if not url:
            continue
        if not url.startswith(URL_SCHEMES):
            raise InputError(f"{path}:{number}: {url[:80]!r} is not an http:// or https:// URL")
        items.append(Item(url, url=url))
    return items


def fingerprint(items: Sequence[Item]) -> str:
    """What a state file was made for: the items, in order (files by path and size)."""
    described = [[i.id, i.url, i.path.stat().st_size if i.path else None] for i in items]
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()
