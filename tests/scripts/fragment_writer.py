"""Stress for lmsrun's whole-line rule: as a rank's script (``lmsrun -np 4 -- python fragment_writer.py``)
it writes numbered lines to stdout and stderr in random fragments of 1-50 bytes with short random
sleeps; some lines begin with ``\\r`` redraws, some are 100 kB long (written in one write, more than a
pipe buffer), some hold invalid UTF-8; the last line has no newline. As a module, ``check`` reads what
lmsrun printed and wrote to ``rank<R>.log`` and counts the lines that did not arrive whole and in order.

Line ``i`` of rank ``r`` on stream ``s`` is ``R<r> S<s> L<i> <payload>``; writer and checker make the
same lines from the seed."""
from __future__ import annotations

import argparse
import os
import random
import re
import time
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

ALPHABET = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;-_=+[]()<>{}/"
LONG = 100_000
LINE = re.compile(rb"^R(\d+) S([oe]) L(\d+) ")
REDRAW = re.compile(rb"^(redraw \d+)?$")


def lines_of(rank: int, seed: int, count: int) -> List[Tuple[str, bytes, bytes]]:
    """(stream, redraws, text) of each line a rank writes; ``text`` is what must arrive whole."""
    rng = random.Random(seed * 1000 + rank)
    numbers = {"o": 0, "e": 0}
    result = []
    for _ in range(count):
        stream = "e" if rng.random() < 0.2 else "o"
        size = LONG if rng.random() < 1 / 250 else rng.randint(0, 80)
        payload = bytes(rng.choice(ALPHABET) for _ in range(min(size, 200))) * (size // 200 or 1)
        if rng.random() < 0.05:
            payload += b"\xff\xfe\xc3(" + payload[:5]  # not UTF-8
        redraws = b"".join(b"\rredraw %d" % k for k in range(rng.randint(1, 5))) + b"\r" if rng.random() < 0.05 else b""
        result.append((stream, redraws, b"R%d S%s L%d " % (rank, stream.encode(), numbers[stream]) + payload))
        numbers[stream] += 1
    return result


def write(rank: int, seed: int, count: int) -> None:
    rng = random.Random(seed * 1000 + rank + 500)
    items = lines_of(rank, seed, count)
    for index, (stream, redraws, text) in enumerate(items):
        fd = 2 if stream == "e" else 1
        data = redraws + text + (b"\n" if index < len(items) - 1 else b"")  # the last: no newline, then exit
        head = data if len(data) < LONG else data[:rng.randint(1, 50)]
        tail = b"" if len(data) < LONG else data[len(head) + LONG // 2:]
        for start, size in _fragments(rng, len(head)):
            os.write(fd, head[start:start + size])
            if rng.random() < 0.05:
                time.sleep(rng.random() * 0.002)
        if tail:
            os.write(fd, data[len(head):len(head) + LONG // 2])  # larger than a pipe's buffer
            for start, size in _fragments(rng, len(tail)):
                os.write(fd, tail[start:start + size])


def _fragments(rng: random.Random, total: int):
    start = 0
    while start < total:
        size = rng.randint(1, 50)
        yield start, size
        start += size


@dataclass
class Verdict:
    """Lines that did not arrive whole (or in order) per place: 'stdout', 'stderr', 'rank<R>.log'."""

    expected: int = 0
    garbled: Dict[str, int] = field(default_factory=dict)
    examples: List[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.garbled.values())


def check(out: bytes, err: bytes, log_dir: str, ranks: int, seed: int, count: int) -> Verdict:
    """Compare lmsrun's terminal streams and rank logs with the lines the ranks wrote."""
    expected = {(r, s): [t for st, _, t in lines_of(r, seed, count) if st == s] for r in range(ranks) for s in "oe"}
    verdict = Verdict(expected=ranks * count)
    seen: Dict[Tuple[str, int, str], List[bytes]] = {}
    places = [("stdout", out, True), ("stderr", err, True)]
    places += [(f"rank{r}.log", open(os.path.join(log_dir, f"rank{r}.log"), "rb").read(), False)
               for r in range(ranks)]
    for place, data, prefixed in places:
        bad = 0
        for raw in data.split(b"\n")[:-1] if data.endswith(b"\n") else data.split(b"\n"):
            rank = int(place[4:-4]) if not prefixed else 0
            if prefixed and raw.startswith(b"[") and b"] " in raw[:8] and raw[1:raw.index(b"]")].isdigit():
                rank, raw = int(raw[1:raw.index(b"]")]), raw[raw.index(b"] ") + 2:]
            *redraws, text = raw.split(b"\r")
            match = LINE.match(text)
            if not all(REDRAW.match(r) for r in redraws) or (text and not match) or (
                    match and int(match.group(1)) != rank):
                bad += 1
                _example(verdict, place, raw)
            elif match:
                seen.setdefault((place, rank, match.group(2).decode()), []).append(text)
        for rank in range(ranks):
            if not prefixed and place != f"rank{rank}.log":
                continue
            for stream in "oe":
                if prefixed and place != ("stdout" if stream == "o" else "stderr"):
                    continue
                wrong = _wrong(seen.get((place, rank, stream), []), expected[(rank, stream)])
                if wrong:
                    _example(verdict, place, b"rank %d stream %s: %d of %d lines wrong or missing"
                             % (rank, stream.encode(), wrong, len(expected[(rank, stream)])))
                bad += wrong
        verdict.garbled[place] = bad
    return verdict


def _wrong(got: List[bytes], want: List[bytes]) -> int:
    """Lines of ``want`` missing from ``got``, plus lines of ``got`` that are not in ``want``, repeated,
    or out of order (lines are unique: each holds its number)."""
    index = {line: i for i, line in enumerate(want)}
    wrong, last, found = 0, -1, set()
    for line in got:
        i = index.get(line)
        if i is None or i in found or i < last:
            wrong += 1
        else:
            last = i
        if i is not None:
            found.add(i)
    return wrong + len(want) - len(found)


def _example(verdict: Verdict, place: str, raw: bytes) -> None:
    if len(verdict.examples) < 5:
        verdict.examples.append(f"{place}: {raw[:120]!r}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--marker", default="")
    args = parser.parse_args()
    write(int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK", "0"))), args.seed, args.lines)
