"""`requant store info|verify PATH`."""
from __future__ import annotations

import argparse
import sys


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a (remote)"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def _info(args: argparse.Namespace) -> int:
    from .store import CaptureStore

    info = CaptureStore.open(args.path).info()
    m = info.meta
    print(f"store      {info.path}")
    print(f"model      {m.model or '—'} {m.revision}".rstrip())
    print(f"capture    {m.capture_point}  rows of {m.hc_mult}×{m.hidden_size} {m.dtype}")
    print(f"created    {m.created_at}  (requant {m.requant_version or '?'}, format {m.format})")
    print(f"rows       {info.rows:,}  sequences {info.sequences:,}")
    ratio = f"{info.ratio:.2f}×" if info.ratio else "n/a"
    print(f"bytes      raw {_fmt_bytes(info.raw_bytes)}  stored {_fmt_bytes(info.stored_bytes)}  ratio {ratio}")
    for name, (rows, seqs) in info.writers.items():
        print(f"  writer {name:24s} rows {rows:>12,}  sequences {seqs:>9,}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .schema import CorruptStoreError, IncompatibleStoreError
    from .store import CaptureStore

    try:
        store = CaptureStore.open(args.path)
        problems = store.verify()
    except (CorruptStoreError, IncompatibleStoreError) as e:  # its metadata is damaged: a problem of the store
        problems = [str(e)]
    if problems:
        for p in problems:
            print(f"FAIL {p}", file=sys.stderr)
        print(f"{len(problems)} problem(s) in {args.path}", file=sys.stderr)
        return 1
    info = store.info()
    what = ("metadata, commit records, index entries and every sequence's rows checksummed" if store.checksummed
            else "every chunk read and checksummed, index consistent (a format-2 store has no metadata checksums)")
    print(f"OK {args.path}: {info.rows:,} rows, {info.sequences:,} sequences in {len(info.writers)} "
          f"writer group(s); {what}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("store", help="inspect or check a capture store")
    s = p.add_subparsers(dest="store_command", metavar="ACTION", required=True)
    i = s.add_parser("info", help="rows, sequences, bytes, compression ratio, per-writer counts")
    i.add_argument("path")
    i.set_defaults(func=_info)
    v = s.add_parser("verify", help="read every chunk (crc32c), check index and commit records")
    v.add_argument("path")
    v.set_defaults(func=_verify)
