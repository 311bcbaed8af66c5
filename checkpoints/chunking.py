"""Where large blobs are cut into chunks, so that a small change rewrites a few chunks, not the whole value.

Two kinds of data, two ways to cut:

* **Out-of-band buffers** (numpy arrays, pandas blocks) are cut at fixed
  offsets, every :data:`BUFFER_CHUNK_BYTES`.  An element written in place
  changes one chunk; the offsets are page multiples (512 KiB, or more for buffers over 1 GiB), so a restored buffer can
  map each chunk file at its place (``mapping.py``) and its pages' dirty bits
  tell which chunks a later checkpoint must read again (``dirty.py``).
* **Pickle streams** (a list of two million dicts) are cut where their
  content says (content-defined chunking, as FastCDC does): a boundary falls
  where a rolling hash of the last :data:`_WINDOW` bytes matches a mask, so an
  insertion shifts the bytes after it without moving the boundaries there.
  The masks are "normalized": harder to match before the target size, easier
  after it, which keeps chunk sizes close to the target (a changed byte then
  costs about one target-sized chunk).  The rolling hash is a moving sum of
  per-byte random values, computed with numpy when the process has imported
  it (a kernel holding big pickles almost always has); without numpy the
  stream is cut at fixed offsets, which still keeps in-place edits and
  appends cheap.  Either way the cuts depend only on the bytes.

Sizes are a trade-off measured in ``benchmarks/``: each chunk costs a manifest
entry (about 130 bytes) and a file, so smaller chunks mean smaller rewrites but
bigger manifests; 512 KiB keeps one changed element of a 1 GiB array under
1 MiB written, and 64 KiB one changed field among two million dicts under
256 KiB.
"""

from __future__ import annotations

import mmap
import sys
from typing import Any

PAGE = mmap.PAGESIZE

#: Out-of-band buffers larger than this are stored as fixed-size chunks of at least this size (a page multiple).
BUFFER_CHUNK_BYTES = 512 * 1024
#: At most about this many chunks per buffer: chunks double in size past 1 GiB, so that the manifest, which
#: lists every chunk (about 130 bytes each), stays small beside the data.
MAX_CHUNKS = 2048
#: Pickle streams larger than this are stored as content-defined chunks.
STREAM_CHUNK_FROM = 1 << 20
STREAM_MIN_BYTES = 16 * 1024
STREAM_AVG_BYTES = 64 * 1024
STREAM_MAX_BYTES = 256 * 1024
_WINDOW = 32
#: Normalized chunking: two more bits to match before the target size, two fewer after it.
_MASK_HARD = (1 << 18) - 1
_MASK_EASY = (1 << 14) - 1
_BLOCK = 4 << 20


def buffer_cuts(nbytes: int, address: int | None = None) -> list[tuple[int, int]]:
    """``(start, end)`` of each chunk of an out-of-band buffer of ``nbytes`` (one piece if it is small).

    With the buffer's ``address``, the chunks after the first start on page
    boundaries of memory: a first piece shorter than a page (the "head", up to
    the first page boundary) comes before them.  A restored buffer is placed at
    the same offset in its page, so its chunks are cut the same way again, and
    each chunk can be backed by its blob file (``mapping.py``).  Likewise a
    last piece shorter than a page (the "tail", after the last page boundary)
    comes after them, so that every other chunk is whole pages: a chunk whose
    pages nobody wrote is then known unchanged (``tracking.py``), never read.
    """
    if nbytes <= BUFFER_CHUNK_BYTES:
        return [(0, nbytes)]
    size = chunk_bytes(nbytes)
    head = (-address) % PAGE if address is not None else 0
    cuts = [(0, head)] if head else []
    cuts += [(start, min(start + size, nbytes)) for start in range(head, nbytes, size)]
    tail = (address + nbytes) % PAGE if address is not None else 0
    start, end = cuts[-1]
    if tail and end - start > tail:
        cuts[-1:] = [(start, end - tail), (end - tail, end)]
    return cuts


def chunk_bytes(nbytes: int) -> int:
    """The chunk size of a buffer of ``nbytes``: 512 KiB, doubled until it makes at most :data:`MAX_CHUNKS`."""
    size = BUFFER_CHUNK_BYTES
    while nbytes > size * MAX_CHUNKS:
        size *= 2
    return size


def page_offset(sizes: list[int]) -> int:
    """Where in its page a chunked buffer starts, from its pieces' sizes (see :func:`buffer_cuts`)."""
    return (PAGE - sizes[0]) % PAGE if len(sizes) > 1 and sizes[0] < PAGE else 0


def stream_cuts(data: Any) -> list[tuple[int, int]]:
    """``(start, end)`` of each content-defined chunk of a pickle stream (one piece if it is small)."""
    view = memoryview(data).cast("B")
    n = view.nbytes
    if n <= STREAM_CHUNK_FROM:
        return [(0, n)]
    numpy = sys.modules.get("numpy")
    if numpy is None:  # not imported by the user: importing it here would cost more than it saves
        return [(start, min(start + STREAM_AVG_BYTES, n)) for start in range(0, n, STREAM_AVG_BYTES)]
    hard, easy = _candidates(numpy, view)
    cuts = []
    start = 0
    while n - start > STREAM_MIN_BYTES:
        end = _first(numpy, hard, start + STREAM_MIN_BYTES, min(start + STREAM_AVG_BYTES, n))
        if end is None:
            end = _first(numpy, easy, start + STREAM_AVG_BYTES, min(start + STREAM_MAX_BYTES, n))
        if end is None:
            end = min(start + STREAM_MAX_BYTES, n)
        cuts.append((start, end))
        start = end
    if start < n:
        cuts.append((start, n))
    return cuts


def _first(numpy: Any, positions: Any, low: int, high: int) -> int | None:
    """The first candidate boundary in ``[low, high)``, or None."""
    if low >= high:
        return None
    i = int(numpy.searchsorted(positions, low))
    if i < len(positions) and positions[i] < high:
        return int(positions[i])
    return None


_gear: Any = None


def _candidates(numpy: Any, view: memoryview) -> tuple[Any, Any]:
    """Positions (a chunk's end) where the rolling hash matches the hard mask, and the easy one."""
    global _gear
    if _gear is None:
        # Fixed random values: the cuts must be the same in every process and every version.
        _gear = numpy.random.default_rng(0x5EED_C0DE).integers(0, 1 << 32, 256, dtype=numpy.uint64).astype(numpy.uint32)
    hard, easy = [], []
    n = view.nbytes
    for block_start in range(0, n, _BLOCK):
        lead = min(block_start, _WINDOW)  # the window reaches back into the previous block
        raw = numpy.frombuffer(view[block_start - lead : min(block_start + _BLOCK, n)], dtype=numpy.uint8)
        sums = numpy.cumsum(_gear[raw], dtype=numpy.uint32)
        # Moving sum over the last _WINDOW bytes (wrapping arithmetic keeps the differences exact);
        # h[k] is the hash of the window ending just before offset + k, a candidate chunk end.
        if lead:
            h = sums[_WINDOW:] - sums[:-_WINDOW]
            offset = block_start + 1
        else:
            h = sums[_WINDOW - 1 :].copy()
            h[1:] -= sums[: len(sums) - _WINDOW]
            offset = _WINDOW
        # The hard mask's bits include the easy one's: its candidates are among the easy ones.
        at = numpy.flatnonzero((h & _MASK_EASY) == 0)
        easy.append(at + offset)
        hard.append(at[(h[at] & _MASK_HARD) == 0] + offset)
    return numpy.concatenate(hard), numpy.concatenate(easy)
