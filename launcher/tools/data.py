"""``lmsrun data tokens PATH... --out FILE``: a flat token file for ``data.kind: tokens`` from text,
with a byte-level vocabulary (256 ids, one per byte), so real text trains with no tokenizer to
download. Folders are walked for text files (``--suffix``); files are read as they are.

    lmsrun data tokens /usr/lib/python3.11 --out runs/pystdlib.bin     # then data.path: runs/pystdlib.bin
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Iterator, List

import numpy as np

from lmsdp.launcher.config.argtypes import OneLineParser
from lmsdp.launcher.config.errors import UserError

SUFFIXES = ".py,.txt,.md,.rst"
VOCAB = 256


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="lmsrun data", allow_abbrev=False,
                           description="Make data files for config mode.")
    sub = parser.add_subparsers(dest="what", metavar="{tokens}", required=True)
    tokens = sub.add_parser("tokens", help="byte-level token file (uint16 ids 0-255) from text files or folders",
                            description="Byte-level token file (uint16, vocabulary 256) for data.kind: tokens.")
    tokens.add_argument("paths", nargs="+", metavar="PATH", help="text files, or folders to walk")
    tokens.add_argument("--out", required=True, metavar="FILE", help="the token file to write")
    tokens.add_argument("--suffix", default=SUFFIXES, metavar="LIST",
                        help=f"file endings read in folders (default {SUFFIXES})")
    tokens.add_argument("--max-bytes", type=int, default=0, metavar="N", help="stop after N bytes (0: all)")
    return parser


def text_files(paths: List[str], suffixes: List[str]) -> Iterator[str]:
    """Each file named, and each file under each folder named that ends in one of ``suffixes``, sorted."""
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    if name.endswith(tuple(suffixes)):
                        yield os.path.join(root, name)
        elif os.path.isfile(path):
            yield path
        else:
            raise UserError(f"PATH: not found: {path}")


def write_tokens(paths: List[str], out: str, suffixes: List[str], max_bytes: int = 0) -> int:
    """Write the bytes of every text file as uint16 token ids; returns the number of tokens."""
    written = 0
    tmp = out + ".tmp"
    try:
        with open(tmp, "wb") as handle:
            for path in text_files(paths, suffixes):
                try:
                    with open(path, "rb") as source:
                        data = source.read()
                except OSError as exc:
                    raise UserError(f"PATH: cannot read {path}: {exc.strerror}") from None
                if max_bytes:
                    data = data[:max_bytes - written]
                handle.write(np.frombuffer(data, dtype=np.uint8).astype(np.uint16).tobytes())
                written += len(data)
                if max_bytes and written >= max_bytes:
                    break
        if not written:
            raise UserError(f"PATH: no text found in {', '.join(paths)} (suffixes {', '.join(suffixes)})")
        os.replace(tmp, out)
    except OSError as exc:
        raise UserError(f"--out: cannot write {out}: {exc.strerror}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return written


def main(argv: List[str]) -> int:
    args = build_parser().parse_args(argv)
    folder = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(folder, exist_ok=True)
    suffixes = [s.strip() for s in args.suffix.split(",") if s.strip()]
    count = write_tokens(args.paths, args.out, suffixes, args.max_bytes)
    print(f"[lmsdp] data: {count:,} tokens (byte-level, vocabulary {VOCAB}, uint16) -> {args.out}", file=sys.stderr)
    return 0
