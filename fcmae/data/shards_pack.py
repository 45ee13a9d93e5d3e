"""``fcmae-shards pack SRC OUT``: an ImageFolder, a folder or a file list into tar shards and the
``index.json`` that :class:`fcmae.data.shards.ShardImages` (``data=shards``) reads.

    fcmae-shards pack /data/imagenet/train /data/imagenet-shards/train --shard-size 1GB
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import tarfile
from pathlib import Path

from .sources import ImageFiles, read_file_list, read_labelled_list, scan_folder, scan_image_folder
from .image_io import DataError
from ..loggers import track
from .shards import FORMAT, INDEX


def _parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: a size like 500MB, 1GB or 200000000")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))


def read_source(src: Path, kind: str = "auto") -> ImageFiles:
    """The images to pack: an ImageFolder (``src/<class>/<image>``), a folder, or a file list
    (``path`` or ``path class_name`` per line). ``auto``: a file is a list (labelled when every line
    has two fields), a folder whose entries are all folders is an ImageFolder, else a folder."""
    if kind == "auto":
        if src.is_file():
            lines = [ln.strip() for ln in src.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
            kind = "labelled_list" if lines and all(len(ln.split()) >= 2 for ln in lines) else "filelist"
        elif src.is_dir():
            entries = [p for p in src.iterdir() if not p.name.startswith(".")]
            kind = "imagefolder" if entries and all(p.is_dir() for p in entries) else "folder"
        else:
            raise DataError(f"{src} does not exist")
    readers = {"imagefolder": scan_image_folder, "folder": scan_folder, "filelist": read_file_list,
               "labelled_list": read_labelled_list}
    if kind not in readers:
        raise DataError(f"--source {kind}; use auto, imagefolder, folder, filelist or labelled_list")
    return readers[kind](src)


def pack(src: Path, out: Path, shard_bytes: int = 1 << 30, kind: str = "auto", log=print) -> Path:
    """Pack ``src`` into ``out/shard-NNNNNN.tar`` + ``out/index.json``. The index is written last
    (atomically), so a set without one is an unfinished pack and is refused by the reader."""
    images = read_source(src, kind)
    out.mkdir(parents=True, exist_ok=True)
    if (out / INDEX).exists() or list(out.glob("shard-*.tar")):
        raise DataError(f"{out} already holds shards; pack into an empty folder")
    labelled = images.classes is not None
    shards, members, sources, tar, number = [], [], [], None, 0

    def close():
        nonlocal tar
        if tar is not None:
            tar.close()
            # sources: where each member came from, so a bad member is reported by its original path too
            shards.append({"file": f"shard-{number - 1:06d}.tar", "members": list(members), "sources": list(sources)})
            members.clear()
            sources.clear()
            tar = None

    pairs = track(zip(images.paths, images.labels), len(images), f"packing {src}", unit="image", log_fn=log)
    for i, (path, label) in enumerate(pairs):
        data = Path(path).read_bytes()
        if tar is not None and tar.offset + len(data) > shard_bytes and members:
            close()
        if tar is None:
            tar = tarfile.open(out / f"shard-{number:06d}.tar", "w", format=tarfile.USTAR_FORMAT)
            number += 1
        name = f"{i:09d}{Path(path).suffix.lower()}"
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        offset = tar.offset + len(info.tobuf(tar.format, tar.encoding, tar.errors))  # the data follows its header
        tar.addfile(info, io.BytesIO(data))
        members.append([offset, len(data), name, int(label) if labelled else 0])
        sources.append(str(path))
        if labelled:
            cls = str(int(label)).encode()
            info = tarfile.TarInfo(f"{i:09d}.cls")
            info.size, info.mtime, info.mode = len(cls), 0, 0o644
            tar.addfile(info, io.BytesIO(cls))
    close()
    index = {"format": FORMAT, "source": str(src), "classes": images.classes, "shards": shards}
    tmp = out / f".{INDEX}.tmp"
    tmp.write_text(json.dumps(index))
    os.replace(tmp, out / INDEX)
    total = sum((out / s["file"]).stat().st_size for s in shards)
    log(f"packed {len(images)} images{f' of {len(images.classes)} classes' if labelled else ''} from {src} into "
        f"{len(shards)} shard(s) in {out} ({total / 2**20:.1f} MiB)")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fcmae-shards", description="Pack images into tar shards for data=shards.")
    sub = p.add_subparsers(dest="command", required=True)
    pk = sub.add_parser("pack", help="pack an ImageFolder, a folder or a file list")
    pk.add_argument("src", type=Path, help="an ImageFolder (SRC/<class>/<image>), a folder, or a file list")
    pk.add_argument("out", type=Path, help="an empty folder for the shards and index.json")
    pk.add_argument("--shard-size", type=_parse_size, default=_parse_size("1GB"),
                    help="bytes per shard, e.g. 500MB, 1GB (default 1GB)")
    pk.add_argument("--source", default="auto", help="auto (default), imagefolder, folder, filelist, labelled_list")
    args = p.parse_args(argv)
    try:
        pack(args.src, args.out, args.shard_size, args.source)
    except DataError as exc:
        print(f"fcmae-shards: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
