"""Run ``python -m proxy <args>`` under tracemalloc; each SIGUSR1 writes the top allocations
(and the growth since the previous signal) to FILE.<k>.

    python bench/traced_serve.py /tmp/snap.txt serve --config ...   (used by held_streams.py)

Where held memory goes, by line and by call stack, at the moment the signal arrives, and
live objects by type (FILE.<k>.types; with SLUICE_TRACEMALLOC=0 only those, at full speed).
SIGUSR2 toggles cProfile (the second writes FILE.calls): Python calls per request are
counted, not timed, so a busy machine does not change them. SLUICE_TRACEMALLOC=0 skips
tracemalloc (its overhead) when only the call counts are wanted.
"""

from __future__ import annotations

import collections
import cProfile
import ctypes
import gc
import io
import os
import pstats
import signal
import struct
import sys
import tracemalloc
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from proxy.allocator import current as current_allocator

_snapshots: list[tracemalloc.Snapshot] = []
_dumps = [0]


def _dump(out: Path) -> None:
    _dumps[0] += 1
    out = out.with_name(f"{out.name}.{_dumps[0]}")
    # Live objects by type (what holds a stream's bytes, countable per stream); the
    # collector's view only, so str and bytes are not in it.
    kinds = collections.Counter(_kind(o) for o in gc.get_objects())
    with_types = out.with_name(out.name + ".types")
    with_types.write_text("".join(f"{n} {t}\n" for t, n in kinds.most_common()))
    if current_allocator() == "pymalloc":  # (both read pymalloc's own structures)
        _malloc_stats(out.with_name(out.name + ".pymalloc"))
        _arena_census(out.with_name(out.name + ".arenas"))
    if not tracemalloc.is_tracing():
        out.write_text(f"object counts in {with_types.name}\n")
        return
    snap = tracemalloc.take_snapshot()
    lines = [f"total traced: {sum(s.size for s in snap.statistics('filename'))}"]
    if _snapshots:  # what grew since the previous signal
        lines.append("growth since the previous snapshot:")
        lines += [str(d) for d in snap.compare_to(_snapshots[-1], "lineno")[:40]]
    _snapshots.append(snap)
    snap.dump(str(out) + ".snap")  # for offline comparisons (tracemalloc.Snapshot.load)
    lines += [str(stat) for stat in snap.statistics("lineno")[:60]]
    lines.append("\nby call stack:")
    for stat in snap.statistics("traceback")[:30]:
        lines.append(f"{stat.size} B in {stat.count} blocks")
        lines += stat.traceback.format()[-16:]
    out.write_text("\n".join(lines) + "\n")


def _kind(obj: object) -> str:
    """An object's type, and for coroutines and bound methods which function they run."""
    kind = type(obj).__qualname__
    if isinstance(obj, types.CoroutineType | types.AsyncGeneratorType):
        return f"{kind} {obj.__qualname__}"
    if isinstance(obj, types.MethodType):
        return f"{kind} {obj.__func__.__qualname__}"
    return kind


def _malloc_stats(out: Path) -> None:
    """pymalloc's arenas, pools and blocks (``sys._debugmallocstats`` writes to fd 2)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with out.open("wb") as f:
        os.dup2(f.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)


#: CPython 3.10+ on 64-bit: 16 KiB pools (POOL_BITS 14) inside 1 MiB arenas.
_POOL_MASK = ~(16 * 1024 - 1)
_ARENAS_SEEN: list[set[int]] = []


def _arena_of(obj: object) -> int | None:
    """The pymalloc arena index holding ``obj``, read from its pool's header; None when the
    object is not pymalloc's (over 512 bytes, or the header's size class does not match)."""
    size = sys.getsizeof(obj)
    if size > 512:
        return None
    header = ctypes.string_at(id(obj) & _POOL_MASK, 40)
    arenaindex, szidx = struct.unpack_from("<II", header, 32)
    if szidx != (size + 15) // 16 - 1 or arenaindex > 1 << 20:  # not a pool header
        return None
    return arenaindex


def _arena_census(out: Path) -> None:
    """Which pymalloc arenas hold which live objects (the collector's objects and what they
    point to): arenas that stay mapped after a burst and the few objects pinning them.
    Objects that are not the collector's and nobody it knows points to are not seen, nor
    are non-object blocks (dict key tables, list arrays)."""
    seen: dict[int, object] = {}
    for obj in gc.get_objects():
        seen[id(obj)] = obj
        for ref in gc.get_referents(obj):
            seen.setdefault(id(ref), ref)
    by_arena: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for obj in seen.values():
        arena = _arena_of(obj)
        if arena is not None:
            by_arena[arena][type(obj).__qualname__] += 1
    del seen
    earlier = _ARENAS_SEEN[0] if _ARENAS_SEEN else set()
    _ARENAS_SEEN.append(set(by_arena))
    new = len(set(by_arena) - earlier)
    lines = [f"{len(by_arena)} arenas hold seen objects; {new} new since the first dump"]
    for arena, found in sorted(by_arena.items(), key=lambda kv: sum(kv[1].values())):
        mark = "new" if earlier and arena not in earlier else "old"
        top = ", ".join(f"{n} {t}" for t, n in found.most_common(8))
        lines.append(f"arena {arena} ({mark}) {sum(found.values())} objects: {top}")
    out.write_text("\n".join(lines) + "\n")


_profile: list[cProfile.Profile] = []


def _toggle_profile(out: Path) -> None:
    """First SIGUSR2 starts cProfile, the next writes call counts to FILE.calls (and own
    time per function to FILE.tottime, which a busy machine does move; the raw profile to
    FILE.prof) and stops."""
    if not _profile:
        _profile.append(cProfile.Profile())
        _profile[0].enable()
        return
    prof = _profile.pop()
    prof.disable()
    prof.dump_stats(str(out.with_name(out.name + ".prof")))  # for pstats / snakeviz
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("ncalls").print_stats(60)
    out.with_name(out.name + ".calls").write_text(buf.getvalue())
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(80)
    out.with_name(out.name + ".tottime").write_text(buf.getvalue())


def main() -> int:
    out = Path(sys.argv[1])
    if os.environ.get("SLUICE_TRACEMALLOC", "1") == "1":
        tracemalloc.start(16)

    def on_signal(_sig: int, _frame: types.FrameType | None) -> None:
        _dump(out)

    def on_profile(_sig: int, _frame: types.FrameType | None) -> None:
        _toggle_profile(out)

    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGUSR2, on_profile)
    from proxy.cli import main as cli_main

    sys.argv = ["sluice", *sys.argv[2:]]
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
