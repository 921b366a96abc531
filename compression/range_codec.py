"""Range coding of a compressed tensor's two streams (beyond the paper: Deep Compression §4 Huffman-codes them).

Codec ``range-v1``: ``constriction``'s range coder (32-bit words, 24-bit probabilities) driven by adaptive
models that the decoder rebuilds from what it has already decoded, so nothing but the coded words is stored:

- **Positions** (which weights are kept): each row of the tensor viewed as ``(shape[0], rest)`` is cut into
  *lanes* of at most ``LANE`` columns. A lane is coded as the gaps between its kept columns, plus a last gap
  to the lane's end (so an empty lane is one gap and no filler is ever needed). A gap ``g >= 1`` is an
  exp-Golomb bucket with one mantissa bit (symbol ``0`` for 1, ``2b - 1 + m`` for ``2**b + m * 2**(b-1)
  <= g``), coded with adaptive counts chosen by the lane's density so far (the bit length of its mean gap),
  and ``b - 1`` low bits, coded uniformly. All lanes advance in lock step, one gap each per step, so a step
  is a few vectorised calls: a tensor decodes in at most ``LANE + 1`` steps, one symbol per kept weight.
- **Cluster indices**: one categorical stream with Laplace counts, updated after chunks of 16, 32, ... 4096
  symbols (no count table is stored; learning the counts costs about what storing them would).

Chosen by measurement on our LeNet checkpoints (``benchmarks/bench_codec.py``): positions 0.6-8 % and
indices 2-33 % smaller than the paper's Huffman streams (no code-length tables, the per-lane density context,
no loss to whole-bit codes), whole files ~3 % smaller. Coding the mask bit by
bit with a per-row / per-column Bernoulli context measured up to ~3 % smaller still, but it makes one coded
decision per *weight* instead of per kept weight: ~10x slower to decode at 9 % kept (AlexNet fc6: 38M).

Each stream ends in the CRC32 of what it codes (two 16-bit symbols), so a damaged or crafted stream that
decodes to something else is caught here; stray words after the end are refused too, bar one (the decoder
reads a word ahead), which changes nothing decoded. ``constriction`` reports bad data with
``AssertionError``/``KeyError``/``ValueError``: each becomes one ``ValueError``. The encoder and the decoder
run the same functions (``Coder``), so their models cannot drift apart; every model quantity is an integer
count or a ratio of counts (no ``log``/``exp``), so two machines build bit-identical models.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator

import numpy as np
import constriction

Categorical, Uniform = constriction.stream.model.Categorical, constriction.stream.model.Uniform
RangeDecoder, RangeEncoder = constriction.stream.queue.RangeDecoder, constriction.stream.queue.RangeEncoder

CODEC = "range-v1"  # the header's per-tensor codec name; a change to any model below needs a new version
LANE = 4096  # columns per lane: bounds the decode loop (<= LANE + 1 steps) and the largest gap (LANE + 1)
# Rows shorter than this (LeNet-5's conv1: 25 columns) are not lanes of their own: a (64M, 1) weight would
# otherwise need 64M lanes of state, ten times the tensor; such a tensor is coded as one long row.
MIN_ROW = 64
_GAP_SYMBOLS = 2 * (LANE + 1).bit_length() - 1  # 25: buckets of gaps 1 .. 2 * LANE - 1
_CONTEXTS = (LANE + 1).bit_length() + 1  # 14: a lane's first gap, then bit length of its mean gap 1..13
_POW2 = 1 << np.arange((LANE + 1).bit_length(), dtype=np.int64)  # 1, 2, ..., LANE: bit lengths by search
# Gap buckets: symbol s covers gaps _BASE[s] .. _BASE[s] + 2**_LOW_BITS[s] - 1 (1, 2, 3, 4-5, 6-7, 8-11, ...).
_LOW_BITS = np.array([0] + [max(b - 1, 0) for b in range(1, (LANE + 1).bit_length()) for _ in (0, 1)], np.int64)
_BASE = np.array([1] + [(2 + m) << b >> 1 for b in range(1, (LANE + 1).bit_length()) for m in (0, 1)], np.int64)
_SIZES = (1 << _LOW_BITS).astype(np.int32)  # the Uniform alphabet of each bucket's low bits
_FIRST_LOW = int(np.argmax(_LOW_BITS > 0))  # 3: buckets from here on have low bits (gaps 4 and more)
_GAP_PRIOR = 0.5  # initial count of every gap symbol in every context (Krichevsky-Trofimov)
_FIRST_CHUNK, _MAX_CHUNK = 16, 4096  # index symbols coded before the first update of the counts; the cap
_UNIFORM = Uniform()  # model family of the low bits: the alphabet size is a per-symbol parameter
_CHECK = Uniform(1 << 16)  # the stream's CRC32, coded as two 16-bit halves


def row_length(shape: tuple[int, ...] | list[int]) -> int:
    """Columns of a tensor viewed as ``(shape[0], rest)``; 1-D and 0-D tensors, and tensors whose rows are
    shorter than ``MIN_ROW``, are one row (so there are never more than ``numel / MIN_ROW + 1`` lanes)."""
    numel, row = math.prod(shape), math.prod(shape[1:]) if len(shape) >= 2 else 0
    return row if row >= MIN_ROW else max(numel, 1)


def _lanes(numel: int, row: int) -> tuple[np.ndarray, np.ndarray]:
    """Start (flat position) and length of every lane: rows of ``row`` columns, cut into ``LANE`` columns."""
    per_row = -(-row // LANE)
    start = (np.arange(numel // row, dtype=np.int64)[:, None] * row
             + np.arange(per_row, dtype=np.int64)[None, :] * LANE).ravel()
    length = np.minimum(LANE, row - np.arange(per_row, dtype=np.int64) * LANE)
    return start, np.tile(length, numel // row)


def _contexts(advanced: np.ndarray, step: int) -> np.ndarray:
    """Model of each active lane at ``step``: 0 for its first gap, else the bit length of its mean gap."""
    if step == 0:
        return np.zeros(len(advanced), np.int64)
    return np.searchsorted(_POW2, advanced // step, side="right")  # mean gap 1..LANE -> 1..13, integers only


def _groups(contexts: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Active lanes by context, contexts ascending, lanes ascending within each: the coding order of a step."""
    order = np.argsort(contexts.astype(np.uint8), kind="stable")  # small integers: a linear radix sort
    bounds = np.concatenate([[0], np.cumsum(np.bincount(contexts, minlength=_CONTEXTS))])
    return [(c, order[bounds[c]:bounds[c + 1]]) for c in range(_CONTEXTS) if bounds[c + 1] > bounds[c]]


class Coder:
    """One interface over a ``RangeEncoder`` (symbols given, returned as they are) and a ``RangeDecoder``
    (symbols decoded and returned): the encoder and the decoder run the same code, so they cannot drift."""

    def __init__(self, decoder: RangeDecoder | None = None) -> None:
        self.encoder, self.decoder = (RangeEncoder(), None) if decoder is None else (None, decoder)

    def code(self, model: object, amount: int | np.ndarray, symbols: np.ndarray | None) -> np.ndarray:
        """Codes ``amount`` symbols (an int) or one per entry of ``amount`` (per-symbol model parameters)."""
        params = () if isinstance(amount, int) else (amount,)
        if self.decoder is not None:
            return self.decoder.decode(model, *params) if params else self.decoder.decode(model, amount)
        self.encoder.encode(symbols.astype(np.int32), model, *params)
        return symbols

    def check(self, crc: int, what: str) -> None:
        """The stream's last two symbols: the CRC32 of what it codes; then nothing may be left."""
        if self.decoder is None:
            self.encoder.encode(np.array([crc >> 16, crc & 0xFFFF], np.int32), _CHECK)
            return
        if not np.array_equal(self.decoder.decode(_CHECK, 2), [crc >> 16, crc & 0xFFFF]):
            raise ValueError(f"{what} stream is corrupt: what it decodes to fails its CRC32")
        if not self.decoder.maybe_exhausted():
            raise ValueError(f"{what} stream is corrupt: data left after its last symbol")

    def to_bytes(self) -> bytes:
        return self.encoder.get_compressed().astype("<u4").tobytes()


def open_decoder(data: bytes, what: str) -> Coder:
    if len(data) % 4:
        raise ValueError(f"{what} stream has {len(data)} bytes, not a whole number of 32-bit words")
    return Coder(RangeDecoder(np.frombuffer(data, "<u4").astype(np.uint32)))


def guarded(run: Callable[[], np.ndarray], what: str) -> np.ndarray:
    try:
        return run()
    except ValueError:
        raise
    except (AssertionError, KeyError, OverflowError, RuntimeError) as err:  # constriction's "invalid data"
        raise ValueError(f"{what} stream is corrupt: {str(err).splitlines()[0][:120]}") from None


def _positions_crc(positions: np.ndarray) -> int:
    return zlib.crc32(np.asarray(positions, "<i8").tobytes())


def _slice_bounds(n: int, coded: int) -> list[int]:
    """Lanes of one step coded between two updates of the counts: while the counts are young, slices as
    large as what they have seen (at least ``_FIRST_CHUNK``), so the first steps do not code blind."""
    bounds = [0]
    while bounds[-1] < n:
        bounds.append(min(n, bounds[-1] + max(_FIRST_CHUNK, coded + bounds[-1])))
    return bounds


def _code_gaps(coder: Coder, counts: np.ndarray, contexts: np.ndarray, gaps: np.ndarray | None) -> np.ndarray:
    """One slice of a step: bucket symbols by context, then the low bits; returns the gaps, updates ``counts``."""
    given = None if gaps is None else np.searchsorted(_BASE, gaps, side="right") - 1
    symbols = np.empty(len(contexts), np.int64)
    for c, lanes in _groups(contexts):
        symbols[lanes] = coder.code(Categorical(counts[c], perfect=False), len(lanes),
                                    None if given is None else given[lanes])
    out = _BASE[symbols]
    low = np.flatnonzero(symbols >= _FIRST_LOW)
    if len(low):
        out[low] += coder.code(_UNIFORM, _SIZES[symbols[low]], None if gaps is None else gaps[low] - out[low])
    counts += np.bincount(contexts * _GAP_SYMBOLS + symbols, minlength=counts.size).reshape(counts.shape)
    return out


def _run_lanes(coder: Coder, lengths: np.ndarray, gaps: np.ndarray | None = None,
               offset: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The lock-step loop of encoder (``gaps``, each lane's from ``offset``) and decoder (``gaps`` None).

    Yields, after each step, the lanes that reached a kept weight and its column in the lane.
    """
    counts = np.full((_CONTEXTS, _GAP_SYMBOLS), _GAP_PRIOR)
    active, advanced, coded = np.arange(len(lengths)), np.zeros(len(lengths), np.int64), 0
    for step in range(LANE + 2):  # every gap is >= 1: a lane ends within LANE + 1 steps
        if not len(active):
            return
        known = None if gaps is None else gaps[offset[active] + step]
        moved = np.empty(len(active), np.int64)
        bounds = _slice_bounds(len(active), coded)
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            moved[lo:hi] = _code_gaps(coder, counts, _contexts(advanced[lo:hi], step),
                                      None if known is None else known[lo:hi])
        coded += len(active)
        advanced = advanced + moved
        ends = lengths[active] + 1  # a lane's last gap lands one past its last column
        if np.any(advanced > ends):
            raise ValueError("position stream is corrupt: a gap runs past the end of its row")
        hit = advanced < ends
        active, advanced = active[hit], advanced[hit]
        yield active, advanced - 1
    raise ValueError("position stream is corrupt: a lane does not end")


def encode_positions(positions: np.ndarray, numel: int, row: int) -> bytes:
    """Range-codes the kept positions of a tensor of ``numel`` elements in rows of ``row`` columns.

    Args:
        positions: (kept,) strictly ascending flat row-major positions in ``[0, numel)``.
        row: Columns per row (``row_length(shape)``).

    Raises:
        ValueError: positions not ascending or outside the tensor.
    """
    positions = np.asarray(positions, np.int64)
    if len(positions) and (positions[0] < 0 or positions[-1] >= numel or np.any(np.diff(positions) <= 0)):
        raise ValueError(f"positions must be strictly ascending within the tensor's {numel} elements")
    coder = Coder()
    if numel:
        starts, lengths = _lanes(numel, row)
        lane = (positions // row) * -(-row // LANE) + positions % row // LANE  # lanes ascend with positions
        column = positions - starts[lane]
        per_lane = np.bincount(lane, minlength=len(starts))
        offset = np.cumsum(per_lane + 1) - (per_lane + 1)  # where each lane's gaps start in ``gaps``
        rank = np.arange(len(positions)) - np.repeat(offset - np.arange(len(starts)), per_lane)
        gaps = np.empty(len(positions) + len(starts), np.int64)
        gaps[offset[lane] + rank] = column - np.where(rank > 0, np.roll(column, 1), -1)
        last = np.full(len(starts), -1, np.int64)  # each lane's last kept column (-1: none)
        is_last = rank == per_lane[lane] - 1
        last[lane[is_last]] = column[is_last]
        gaps[offset + per_lane] = lengths - last  # to the lane's end, one past its last column
        for _ in _run_lanes(coder, lengths, gaps, offset):
            pass
    coder.check(_positions_crc(positions), "position")
    return coder.to_bytes()


def decode_positions(data: bytes, numel: int, row: int, kept: int) -> np.ndarray:
    """Inverse of ``encode_positions``: the ``kept`` ascending flat positions.

    Raises:
        ValueError: a corrupt stream, or one that holds other than ``kept`` positions (checked while decoding,
            so nothing beyond ``kept`` positions is allocated).
    """
    if not 0 <= kept <= numel:
        raise ValueError(f"{kept} kept weights declared for a tensor of {numel}")
    coder = open_decoder(data, "position")

    def run() -> np.ndarray:
        starts, lengths = _lanes(numel, row) if numel else (np.zeros(0, np.int64),) * 2
        found, steps = 0, []  # per step: (lanes that reached a kept weight, its flat position)
        for lanes, columns in _run_lanes(coder, lengths):
            found += len(lanes)
            if found > kept:
                raise ValueError(f"position stream holds more than the {kept} kept weights the header declares")
            steps.append((lanes, starts[lanes] + columns))
        if found != kept:
            raise ValueError(f"position stream holds {found} kept weights, the header says {kept}")
        # A lane reaches its j-th kept weight at step j; lane by lane is row-major order.
        per_lane = np.bincount(np.concatenate([lanes for lanes, _ in steps] + [np.zeros(0, np.int64)]),
                               minlength=len(starts))
        first, positions = np.cumsum(per_lane) - per_lane, np.empty(kept, np.int64)
        for j, (lanes, flat) in enumerate(steps):
            positions[first[lanes] + j] = flat
        coder.check(_positions_crc(positions), "position")
        return positions

    return guarded(run, "position")


def _chunks(n: int) -> list[tuple[int, int]]:
    """(start, stop) of the index chunks: 16, 32, ... 4096, 4096, ... symbols (counts updated in between)."""
    out, start, size = [], 0, _FIRST_CHUNK
    while start < n:
        out.append((start, min(start + size, n)))
        start, size = start + size, min(2 * size, _MAX_CHUNK)
    return out


def _run_symbols(coder: Coder, n: int, alphabet: int, symbols: np.ndarray | None = None) -> np.ndarray:
    out, counts = np.zeros(n, np.int64), np.ones(alphabet)
    for start, stop in _chunks(n) if alphabet > 1 else []:  # a single cluster: nothing to code
        out[start:stop] = coder.code(Categorical(counts, perfect=False), stop - start,
                                     None if symbols is None else symbols[start:stop])
        counts += np.bincount(out[start:stop], minlength=alphabet)
    coder.check(zlib.crc32(out.astype("<u4").tobytes()), "index")
    return out


def encode_symbols(symbols: np.ndarray, alphabet: int) -> bytes:
    """Range-codes ``symbols`` in ``[0, alphabet)`` (cluster indices) with chunk-adaptive Laplace counts.

    Raises:
        ValueError: symbols outside the alphabet.
    """
    symbols = np.asarray(symbols, np.int64)
    if alphabet < 1 or (len(symbols) and (symbols.min() < 0 or symbols.max() >= alphabet)):
        raise ValueError(f"symbols must lie in [0, {alphabet})")
    coder = Coder()
    _run_symbols(coder, len(symbols), alphabet, symbols)
    return coder.to_bytes()


def decode_symbols(data: bytes, n: int, alphabet: int) -> np.ndarray:
    """Inverse of ``encode_symbols``: ``n`` int64 symbols in ``[0, alphabet)``.

    Raises:
        ValueError: a corrupt stream (the caller bounds ``n`` and ``alphabet`` before this allocates).
    """
    coder = open_decoder(data, "index")
    return guarded(lambda: _run_symbols(coder, n, alphabet), "index")
