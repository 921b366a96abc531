"""Context-adaptive coding of a pruned / quantized tensor (beyond Deep Compression §4, whose streams are Huffman-coded).

Codec ``ctx-v1``, in the spirit of DeepCABAC (Wiedemann et al. 2020, the coder of MPEG's NNR standard): every
weight's *significance* (kept or pruned) and every kept weight's *value* are coded with adaptive probabilities
chosen by what the decoder already knows about the weight's neighbourhood, so no code table is
stored and the spatial structure of a layer is paid for once. The tensor is viewed as ``(R, C)``: its rows are
the output units (``shape[0]``), its columns the inputs (``fc1``: the 784 pixels of a 28x28 image; a conv
weight: ``in x kh x kw``). The coder walks the columns in lock step, one column of all rows per step, so a step
is a few vectorised calls; weight ``(r, j)``'s contexts are:

- **significance**: the density of row ``r`` so far (12 buckets of ``-2 log2((kept + 1/2) / (j + 1))``, one for
  ``j = 0``), and whether the *left* neighbour ``(r, j - 1)`` and the *up* neighbour ``(r, j - d)`` were kept.
  ``d`` (per tensor, in the header) is the offset of the input's second spatial axis (28 for LeNet-300-100's
  ``fc1``, ``kw`` for a conv), chosen by the encoder as the offset whose significance tells most about the
  weight's (mutual information on a sample of rows); ``d = 0``: no up neighbour.
- **value**: its symbol (an index into the ascending codebook) as a *signed rank* (``+1`` the smallest
  non-negative centroid, ``-1`` the largest negative one, ...): a sign bit (contexts: the signs of the two
  neighbours), then the magnitude ``|rank|`` in ``1 .. UNARY`` (or "more") as one adaptive categorical symbol
  (contexts: the neighbours' magnitudes, capped at 3), then, beyond ``UNARY``, the rest as an exp-Golomb code
  (exponent in adaptive bins, mantissa uniform). For a uniform quantizer the rank is the level.

``nb = 0`` in the header turns the neighbour contexts off (small or structureless tensors, where learning them
costs more than they save); the encoder codes each tensor both ways and keeps the shorter. Probabilities are
Krichevsky-Trofimov estimates (``(n1 + 0.4) / (n + 0.8)`` for a bit, ``(n_s + 1/2) / (n + K/2)`` for a symbol)
of integer counts, updated after each slice of a step: ratios of integers, so two machines build bit-identical models. The stream ends in the CRC32 of the decoded ``(C, R)``
rank array (``range_codec.Coder``), and decoding allocates one ``int32`` per weight, as the dense tensor does.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import constriction

from compression.range_codec import Coder, guarded, open_decoder

CODEC = "ctx-v1"  # the header's per-tensor codec name; a change to any model below needs a new version
UNARY = 15  # |rank| 1 .. UNARY is one adaptive symbol (UNARY + 1: larger, the rest exp-Golomb coded)
_BUCKETS = 12  # row-density buckets; bucket _BUCKETS: the row's first column
_SIG_CONTEXTS = (_BUCKETS + 1) * 4  # x left kept x up kept
_MAG_CONTEXTS = 16  # min(|left|, 3) x min(|up|, 3)
_SIGN_CONTEXTS = 9  # sign of left (none, +, -) x sign of up
_EXP_CONTEXTS = 32  # the exponent bins of a magnitude beyond UNARY (levels up to 2**24: 25 bins)
_FIRST_SLICE = 16  # bits coded before a context's counts are first updated
_TRIAL_ROWS, _TRIAL_COLUMNS, _TRIAL_NUMEL = 256, 1024, 1 << 20  # a tensor over 1M weights picks its mode
# on ~256 of its rows and its first 1024 columns
MAX_UP = 4096  # the largest up offset a header may declare
_WIDE = 64  # a (R, C) view with C > _WIDE * R and C > 4096 is coded as (numel, 1): steps stay few
_POW2 = 1 << np.arange(63, dtype=np.int64)
_BERNOULLI, _UNIFORM = constriction.stream.model.Bernoulli(perfect=False), constriction.stream.model.Uniform()
_CATEGORICAL = constriction.stream.model.Categorical(perfect=False)


def matrix_shape(shape: list[int] | tuple[int, ...]) -> tuple[int, int]:
    """``(R, C)``: rows (output units) by columns (inputs) of the coded view; 1-D tensors are ``(n, 1)``."""
    numel = math.prod(shape)
    rows = shape[0] if len(shape) >= 2 and shape[0] else numel
    cols = numel // rows if rows else 0
    if cols > _WIDE * rows and cols > 4096:
        return numel, 1
    return rows, cols


def _buckets(kept: np.ndarray, j: int) -> np.ndarray:
    """Row-density bucket of each row at column ``j``: floor(log2(4 (j+1)^2 / (2 kept + 1)^2)), integers only."""
    if j == 0:
        return np.full(len(kept), _BUCKETS, np.int64)
    jj = min(j + 1, 1 << 28)
    ratio = np.maximum((4 * jj * jj) // (2 * np.minimum(kept, jj) + 1) ** 2, 1)
    return np.minimum(np.searchsorted(_POW2, ratio, side="right") - 1, _BUCKETS - 1)


def _bits(coder: Coder, counts: np.ndarray, ctx: np.ndarray, bits: np.ndarray | None) -> np.ndarray:
    """Codes one bit per context in ``ctx`` and counts it: in slices no larger than what the least seen of those
    contexts has seen (at least ``_FIRST_SLICE``), so a long batch (a bias: one step of all its rows) does not
    code its first bits blind. P(bit = 1) of a context is ``(n1 + 0.4) / (n + 0.8)`` (Krichevsky-Trofimov)."""
    out, start = np.empty(len(ctx), np.int64), 0
    while start < len(ctx):
        totals = counts.sum(1)
        seen = int(totals.min()) if len(ctx) - start <= _FIRST_SLICE else int(totals[ctx[start:]].min())
        stop = min(len(ctx), start + max(_FIRST_SLICE, seen))
        part = ctx[start:stop]
        p = ((5 * counts[:, 1] + 2) / (5 * totals + 4))[part]  # per context (a few dozen), then gathered
        out[start:stop] = coder.code(_BERNOULLI, p, None if bits is None else bits[start:stop])
        counts += np.bincount(part * 2 + out[start:stop], minlength=counts.size).reshape(counts.shape)
        start = stop
    return out


def _symbols(coder: Coder, counts: np.ndarray, ctx: np.ndarray, symbols: np.ndarray | None) -> np.ndarray:
    """``_bits`` for symbols in ``[0, counts.shape[1])``: P(s) of a context ``(n_s + 1/2) / (n + K/2)``."""
    out, start, size = np.empty(len(ctx), np.int64), 0, counts.shape[1]
    while start < len(ctx):
        totals = counts.sum(1)
        seen = int(totals.min()) if len(ctx) - start <= _FIRST_SLICE else int(totals[ctx[start:]].min())
        stop = min(len(ctx), start + max(_FIRST_SLICE, seen))
        part = ctx[start:stop]
        p = ((2 * counts + 1) / (2 * totals + size)[:, None])[part]  # (n, K), rows of the contexts' tables
        out[start:stop] = coder.code(_CATEGORICAL, p, None if symbols is None else symbols[start:stop])
        counts += np.bincount(part * size + out[start:stop], minlength=counts.size).reshape(counts.shape)
        start = stop
    return out


class _Values:
    """The value models of one tensor: signs, unary magnitude bins and the uniform rest."""

    def __init__(self, negatives: int, positives: int) -> None:
        self.negatives, self.positives = negatives, positives
        self.sign = np.zeros((_SIGN_CONTEXTS, 2), np.int64)
        self.mag = np.zeros((_MAG_CONTEXTS, UNARY + 1), np.int64)
        self.exp = np.zeros((_EXP_CONTEXTS, 2), np.int64)

    def code(self, coder: Coder, left: np.ndarray, up: np.ndarray, ranks: np.ndarray | None, n: int) -> np.ndarray:
        """The signed ranks of ``n`` kept weights whose neighbours' ranks are ``left`` and ``up``."""
        if self.negatives and self.positives:
            ctx = 3 * _sign3(left) + _sign3(up)
            negative = _bits(coder, self.sign, ctx, None if ranks is None else (ranks < 0).astype(np.int32))
        else:
            negative = np.full(n, int(self.positives == 0), np.int64)
        side = np.where(negative == 1, self.negatives, self.positives)  # the largest |rank| of each one's side
        ctx = 4 * np.minimum(np.abs(left), 3) + np.minimum(np.abs(up), 3)
        given = None if ranks is None else np.minimum(np.abs(ranks), UNARY + 1) - 1
        mags = 1 + _symbols(coder, self.mag, ctx, given)  # |rank| 1 .. UNARY, or UNARY + 1: "more"
        going = np.flatnonzero(mags > UNARY)
        if len(going):  # |rank| > UNARY: the rest, r = |rank| - UNARY - 1, as an exp-Golomb code
            mags[going] = UNARY + 1 + self._rest(coder, side[going] - UNARY - 1,
                                                 None if ranks is None else np.abs(ranks[going]) - UNARY - 1)
        if np.any(mags > side):
            raise ValueError("context stream is corrupt: a value beyond its codebook")
        return np.where(negative == 1, -mags, mags)


    def _rest(self, coder: Coder, most: np.ndarray, rest: np.ndarray | None) -> np.ndarray:
        """``r`` in ``0 .. most``: its exponent ``e = bit_length(r + 1) - 1`` in adaptive unary bins (context:
        the bin), then ``e`` mantissa bits, uniform."""
        top = np.searchsorted(_POW2, most + 1, side="right") - 1  # the largest exponent each can have
        exponent, going = np.zeros(len(most), np.int64), np.flatnonzero(top > 0)
        given = None if rest is None else np.searchsorted(_POW2, rest + 1, side="right") - 1
        for e in range(int(top.max(initial=0))):
            if not len(going):
                break
            more = _bits(coder, self.exp, np.full(len(going), min(e, _EXP_CONTEXTS - 1)),
                         None if given is None else (given[going] > e).astype(np.int32))
            going = going[more == 1]
            exponent[going] = e + 1
            going = going[top[going] > e + 1]
        out = _POW2[exponent] - 1
        wide = np.flatnonzero(exponent)
        if len(wide):
            out[wide] += coder.code(_UNIFORM, _POW2[exponent[wide]].astype(np.int32),
                                    None if rest is None else (rest[wide] + 1 - _POW2[exponent[wide]]).astype(np.int32))
        return out


def _sign3(ranks: np.ndarray) -> np.ndarray:
    return np.where(ranks > 0, 1, np.where(ranks < 0, 2, 0))


def _run(coder: Coder, table: np.ndarray, negatives: int, positives: int, nb: bool, up: int,
         given: bool) -> np.ndarray:
    """The walk of encoder (``given``: ``table`` holds the ranks) and decoder (``table`` zeros, filled in).

    ``table`` is ``(C, R)``: column ``j`` of every row, the rank of each weight (0: pruned; 1 for every kept
    weight of a tensor that is not quantized).
    """
    cols, rows = table.shape
    sig = np.zeros((_SIG_CONTEXTS, 2), np.int64)
    values = _Values(negatives, positives) if negatives + positives else None
    kept, none = np.zeros(rows, np.int64), np.zeros(rows, np.int32)
    for j in range(cols):
        left = table[j - 1] if nb and j >= 1 else none
        above = table[j - up] if nb and up and j >= up else none
        ctx = 4 * _buckets(kept, j) + 2 * (left != 0) + (above != 0)
        bits = _bits(coder, sig, ctx, (table[j] != 0).astype(np.int32) if given else None)
        kept += bits
        hit = np.flatnonzero(bits)
        if not len(hit):
            continue
        if values is None:
            table[j, hit] = 1
        else:
            ranks = values.code(coder, left[hit], above[hit], table[j, hit] if given else None, len(hit))
            if not given:
                table[j, hit] = ranks
    return table


def _best_up(mask: np.ndarray, shape: list[int] | tuple[int, ...]) -> int:
    """The up offset ``d`` whose significance tells most about a weight's (mutual information), 0 if none."""
    rows, cols = mask.shape
    if len(shape) == 4:
        candidates = {shape[3], shape[2] * shape[3]}
    else:
        divisors = [d for d in range(2, 65) if cols % d == 0]
        candidates = set(divisors) | {d * d for d in divisors}
    candidates = sorted(d for d in candidates if 2 <= d < min(cols, MAX_UP + 1))
    sample = np.ascontiguousarray(mask[:256], dtype=bool)
    best, best_info = 0, 1e-3  # below ~a thousandth of a bit per weight: not worth the contexts
    for d in candidates:
        a, b = sample[:, d:], sample[:, :-d]  # counted in place: no copy of the sample per candidate
        n, n11, na, nb = a.size, np.count_nonzero(a & b), np.count_nonzero(a), np.count_nonzero(b)
        joint = np.array([[n - na - nb + n11, nb - n11], [na - n11, n11]]) / max(n, 1)
        pa, pb = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
        nz = joint > 0
        info = float((joint[nz] * np.log2(joint[nz] / (pa @ pb)[nz])).sum())
        if info > best_info:
            best, best_info = d, info
    return best


def encode(positions: np.ndarray, ranks: np.ndarray | None, shape: list[int], negatives: int = 0,
           positives: int = 0) -> tuple[bytes, int, int]:
    """Codes a tensor's kept positions and (quantized) their signed ranks; returns (stream, nb, up).

    Args:
        positions: (kept,) ascending flat row-major positions.
        ranks: (kept,) signed ranks (``-negatives .. -1, 1 .. positives``), or None for a tensor whose values
            are stored elsewhere (then ``negatives = positives = 0``).
        shape: The tensor's shape.

    Raises:
        ValueError: positions or ranks out of range.
    """
    rows, cols = matrix_shape(shape)
    numel = rows * cols
    positions = np.asarray(positions, np.int64)
    if len(positions) and (positions[0] < 0 or positions[-1] >= numel or np.any(np.diff(positions) <= 0)):
        raise ValueError(f"positions must be strictly ascending within the tensor's {numel} elements")
    table = np.zeros((cols, rows), np.int32)
    if ranks is None:
        table[positions % max(cols, 1), positions // max(cols, 1)] = 1
    else:
        ranks = np.asarray(ranks, np.int64)
        if len(ranks) != len(positions) or np.any(ranks == 0) or np.any(ranks < -negatives) or np.any(ranks > positives):
            raise ValueError(f"ranks must be one per position, non-zero, in [-{negatives}, {positives}]")
        table[positions % cols, positions // cols] = ranks
    up = _best_up(table[:, :256].T != 0, shape) if numel else 0  # its sample: the first 256 rows
    modes = list(dict.fromkeys([(False, 0), (True, 0), (True, up)]))  # each once, in this order
    if rows > _TRIAL_ROWS and numel > _TRIAL_NUMEL:  # a large tensor: each mode tried on a sample of its rows
        sample = np.ascontiguousarray(table[:_TRIAL_COLUMNS, :: rows // _TRIAL_ROWS])  # steps cost, not rows
        modes = [min(modes, key=lambda mode: len(_encoded(sample, negatives, positives, *mode)))]
    return min(((_encoded(table, negatives, positives, *mode), int(mode[0]), mode[1]) for mode in modes),
               key=lambda result: len(result[0]))


def _encoded(table: np.ndarray, negatives: int, positives: int, nb: bool, up: int) -> bytes:
    coder = Coder()
    _run(coder, table, negatives, positives, nb, up, given=True)
    coder.check(zlib.crc32(table.tobytes()), "context")
    return coder.to_bytes()


def decode(data: bytes, shape: list[int], kept: int, negatives: int, positives: int, nb: int,
           up: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of ``encode``: (ascending flat positions, signed ranks; all 1 for a tensor not quantized).

    Raises:
        ValueError: a corrupt stream, or one holding other than ``kept`` weights.
    """
    rows, cols = matrix_shape(shape)
    if not 0 <= kept <= rows * cols:
        raise ValueError(f"{kept} kept weights declared for a tensor of {rows * cols}")
    if nb not in (0, 1) or not 0 <= up <= MAX_UP or up == 1:
        raise ValueError(f"bad context fields nb={nb!r}, up={up!r}")
    coder = open_decoder(data, "context")

    def run() -> np.ndarray:
        table = _run(coder, np.zeros((cols, rows), np.int32), negatives, positives, bool(nb), up, given=False)
        coder.check(zlib.crc32(table.tobytes()), "context")
        return table

    table = guarded(run, "context").T
    flat = np.flatnonzero(table)
    if len(flat) != kept:
        raise ValueError(f"context stream holds {len(flat)} kept weights, the header says {kept}")
    return flat, table.ravel()[flat].astype(np.int64)
