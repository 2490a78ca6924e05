"""Run ``python -m proxy <args>`` under tracemalloc; each SIGUSR1 writes the top allocations
(and the growth since the previous signal) to FILE.<k>.

    python bench/traced_serve.py /tmp/snap.txt serve --config ...   (used by held_streams.py)

Where held memory goes, by line and by call stack, at the moment the signal arrives.
"""

from __future__ import annotations

import signal
import sys
import tracemalloc
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


_snapshots: list[tracemalloc.Snapshot] = []


def _dump(out: Path) -> None:
    snap = tracemalloc.take_snapshot()
    lines = [f"total traced: {sum(s.size for s in snap.statistics('filename'))}"]
    if _snapshots:  # what grew since the previous signal
        lines.append("growth since the previous snapshot:")
        lines += [str(d) for d in snap.compare_to(_snapshots[-1], "lineno")[:40]]
    _snapshots.append(snap)
    out = out.with_name(f"{out.name}.{len(_snapshots)}")
    lines += [str(stat) for stat in snap.statistics("lineno")[:60]]
    lines.append("\nby call stack:")
    for stat in snap.statistics("traceback")[:30]:
        lines.append(f"{stat.size} B in {stat.count} blocks")
        lines += stat.traceback.format()[-16:]
    out.write_text("\n".join(lines) + "\n")


def main() -> int:
    out = Path(sys.argv[1])
    tracemalloc.start(16)

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        _dump(out)

    signal.signal(signal.SIGUSR1, on_signal)
    from proxy.cli import main as cli_main

    sys.argv = ["sluice", *sys.argv[2:]]
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
