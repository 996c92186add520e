"""Where a server's time goes, from a py-spy profile in collapsed-stack form (``py-spy record -f raw``).

    py-spy record -p <server pid> -d 10 -r 200 -f raw -o profile.txt
    python bench/profile_summary.py profile.txt --top 25

Prints each function's share of all samples twice: inclusive (on the stack at all) and self (the frame running).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^:]*)(?::\d+)?\)$")


def frame_name(frame: str) -> str:
    """``function (path/to/file.py:line)`` as ``file.py:function``, so lines of one function count together."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    path = match["file"]
    for marker in ("site-packages/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{path}:{match['function']}"


def summarize(lines: list[str]) -> tuple[int, Counter[str], Counter[str]]:
    total = 0
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for line in lines:
        stack, _, count_text = line.rstrip().rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame_name(f) for f in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    return total, inclusive, own


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    total, inclusive, own = summarize(args.profile.read_text().splitlines())
    print(f"{total} samples")
    print("\ninclusive %  function")
    for name, count in inclusive.most_common(args.top):
        print(f"{100 * count / total:10.1f}  {name}")
    print("\n     self %  function")
    for name, count in own.most_common(args.top):
        print(f"{100 * count / total:10.1f}  {name}")


if __name__ == "__main__":
    main()
