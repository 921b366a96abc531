"""Canonical Huffman coding (compression/huffman.py): lengths, codes, round trips, corrupt input."""

from __future__ import annotations

import heapq
import struct
from itertools import pairwise

import numpy as np
import pytest

from compression import huffman
from compression.huffman import (
    MAX_CODE_LENGTH,
    HuffmanStream,
    canonical_codes,
    code_lengths,
    decode,
    encode,
    entropy_bits,
)


def huffman_cost(counts: np.ndarray) -> int:
    """Total coded bits of an unlimited Huffman code: the sum of all merged weights (textbook heap)."""
    heap = [int(c) for c in counts if c > 0]
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        cost += merged
        heapq.heappush(heap, merged)
    return cost


def gaussian_symbols(n: int, n_values: int, seed: int = 0) -> np.ndarray:
    """Cluster indices of Gaussian weights on a linear grid (the paper's linear init): a skewed stream."""
    w = np.random.default_rng(seed).standard_normal(n)
    edges = np.linspace(w.min(), w.max(), n_values + 1)[1:-1]
    return np.searchsorted(edges, w)


def test_lengths_of_a_hand_checked_distribution() -> None:
    # counts [5, 2, 1, 1]: merge 1+1 -> 2, then 2+2 -> 4, then 4+5 -> 9, so symbol 0 sits at depth 1,
    # symbol 1 at depth 2, symbols 2 and 3 at depth 3; canonical codes 0, 10, 110, 111.
    lengths = code_lengths(np.array([5, 2, 1, 1]))
    assert lengths.tolist() == [1, 2, 3, 3]
    assert lengths.dtype == np.uint8
    assert canonical_codes(lengths).tolist() == [0b0, 0b10, 0b110, 0b111]


def test_lengths_of_absent_and_lone_symbols() -> None:
    assert code_lengths(np.array([0, 7, 0])).tolist() == [0, 1, 0]  # a lone symbol still costs 1 bit
    assert code_lengths(np.array([0, 0])).tolist() == [0, 0]
    assert code_lengths(np.array([3, 0, 9])).tolist() == [1, 0, 1]


@pytest.mark.parametrize("seed", range(5))
def test_lengths_are_optimal_when_the_limit_does_not_bind(seed: int) -> None:
    counts = np.random.default_rng(seed).integers(0, 1000, size=200)
    lengths = code_lengths(counts)
    assert lengths.max() <= MAX_CODE_LENGTH
    assert int((counts * lengths).sum()) == huffman_cost(counts)


def test_fibonacci_counts_need_and_get_the_length_limit() -> None:
    fib = [1, 1]
    while len(fib) < 25:
        fib.append(fib[-1] + fib[-2])
    counts = np.array(fib)  # unlimited Huffman would give the rarest symbols 24-bit codes
    lengths = code_lengths(counts)
    assert lengths.max() == MAX_CODE_LENGTH
    assert (2.0 ** -lengths.astype(float)).sum() <= 1.0
    symbols = np.random.default_rng(0).permutation(np.repeat(np.arange(25), counts))
    stream = encode(symbols, 25)
    np.testing.assert_array_equal(decode(stream), symbols)
    assert stream.n_bits == int((counts * lengths).sum())


@pytest.mark.parametrize("alphabet", [2, 7, 64, 300])
def test_canonical_codes_are_prefix_free(alphabet: int) -> None:
    counts = np.random.default_rng(alphabet).zipf(1.5, size=alphabet)
    lengths = code_lengths(counts)
    assert (2.0 ** -lengths[lengths > 0].astype(float)).sum() <= 1.0  # Kraft
    codes = [format(int(c), f"0{int(n)}b") for c, n in zip(canonical_codes(lengths), lengths)]
    words = sorted(codes)
    assert all(not b.startswith(a) for a, b in pairwise(words))  # sorted order puts prefixes adjacent
    order = np.lexsort((np.arange(alphabet), lengths))  # canonical: codes count up in (length, symbol) order
    left = [int(canonical_codes(lengths)[s]) << (MAX_CODE_LENGTH - int(lengths[s])) for s in order]
    assert left == sorted(left)


@pytest.mark.parametrize(("alphabet", "n"), [(1, 10), (2, 1000), (3, 5000), (33, 4096), (256, 30_001),
                                             (1000, 20_000), (1 << 16, 3000), (3, 2_200_000)])
def test_random_round_trip(alphabet: int, n: int) -> None:
    symbols = np.random.default_rng(n).integers(0, alphabet, size=n)
    stream = encode(symbols, alphabet)
    out = decode(HuffmanStream.from_bytes(stream.to_bytes()))
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, symbols)
    assert stream.n_bits == int((code_lengths(np.bincount(symbols, minlength=alphabet)).astype(int)[symbols]).sum())


def test_round_trip_with_64_bit_positions(monkeypatch: pytest.MonkeyPatch) -> None:
    symbols = gaussian_symbols(9000, 100)
    stream = encode(symbols, 100)
    monkeypatch.setattr(huffman, "_U32_BITS", 0)  # what a payload over 512 MiB gets
    np.testing.assert_array_equal(decode(stream), symbols)


@pytest.mark.parametrize("symbols", [[], [4], [4] * 5000, list(range(500))[::-1]],
                         ids=["empty", "one", "one-distinct", "all-distinct"])
def test_degenerate_round_trip(symbols: list[int]) -> None:
    symbols = np.array(symbols, dtype=np.int64)
    stream = encode(symbols, 500)
    np.testing.assert_array_equal(decode(HuffmanStream.from_bytes(stream.to_bytes())), symbols)
    if len(set(symbols.tolist())) == 1:
        assert stream.n_bits == symbols.size  # one bit per symbol


@pytest.mark.parametrize("n_values", [32, 256])
def test_coded_size_is_within_one_percent_of_entropy(n_values: int) -> None:
    symbols = gaussian_symbols(2_000_000, n_values)  # the target of docs/architecture.md: 2M symbols, 32 or 256 values
    counts = np.bincount(symbols)
    bound = entropy_bits(counts)
    stream = encode(symbols, n_values)
    assert huffman_cost(counts) <= stream.n_bits <= 1.0001 * huffman_cost(counts)  # what the 16-bit limit costs
    assert bound <= stream.n_bits <= 1.01 * bound
    assert 8 * len(stream.to_bytes()) <= 1.01 * bound  # lengths, block table and header included


def test_stream_overhead_is_bounded() -> None:
    # Beyond the payload: a 29-byte header, 5 bits per alphabet symbol, and at most 16 bits per block.
    stream = encode(gaussian_symbols(300_000, 64), 64)
    n_blocks = -(-stream.n_symbols // stream.block_size)
    overhead = 8 * len(stream.to_bytes()) - 8 * len(stream.payload)
    assert overhead <= 8 * 29 + 5 * 64 + 16 * (n_blocks - 1) + 16
    assert overhead / stream.n_symbols < 0.02  # bits per symbol


def test_entropy_of_known_distributions() -> None:
    assert entropy_bits(np.array([4, 4])) == pytest.approx(8.0)  # 8 fair coin flips
    assert entropy_bits(np.array([0, 9])) == 0.0
    assert entropy_bits(np.array([2, 1, 1])) == pytest.approx(6.0)  # 2 * 1 bit + 2 * 2 bits


def test_payload_matches_bitarray_bit_for_bit() -> None:
    bitarray = pytest.importorskip("bitarray")
    symbols = gaussian_symbols(20_000, 40, seed=3)
    stream = encode(symbols, 40)
    lengths, codes = stream.lengths, canonical_codes(stream.lengths)
    table = {s: bitarray.bitarray(format(int(codes[s]), f"0{int(lengths[s])}b")) for s in np.flatnonzero(lengths)}
    reference = bitarray.bitarray()  # MSB-first, like ours
    reference.encode(table, symbols.tolist())
    assert stream.payload == reference.tobytes()


def test_serialisation_round_trip_keeps_every_field() -> None:
    stream = encode(gaussian_symbols(10_000, 17), 20)
    back = HuffmanStream.from_bytes(stream.to_bytes())
    np.testing.assert_array_equal(back.lengths, stream.lengths)
    np.testing.assert_array_equal(back.block_bits, stream.block_bits)
    assert (back.n_symbols, back.n_bits, back.payload, back.block_size) == \
        (stream.n_symbols, stream.n_bits, stream.payload, stream.block_size)


def test_every_truncation_and_trailing_bytes_are_rejected() -> None:
    data = encode(gaussian_symbols(3000, 9), 9).to_bytes()
    for cut in range(len(data)):
        with pytest.raises(ValueError, match="truncated"):
            HuffmanStream.from_bytes(data[:cut])
    with pytest.raises(ValueError, match="trailing bytes"):
        HuffmanStream.from_bytes(data + b"\0")


def header(alphabet: int = 4, n_symbols: int = 10, n_bits: int = 20, block: int = 1024, width: int = 0,
           tag: bytes = b"HUF\x01") -> bytes:
    """The fixed 29-byte start of a serialised stream: tag, sizes, block table base and width."""
    return struct.pack("<4sIQQHHB", tag, alphabet, n_symbols, n_bits, block, 0, width)


@pytest.mark.parametrize(("data", "match"), [
    (header(tag=b"PK\x03\x04"), "not a Huffman stream"),
    (header(alphabet=0), "alphabet_size must be in"),
    (header(alphabet=1 << 20), "alphabet_size must be in"),
    (header(block=0), "block_size must be in"),
    (header(n_symbols=21), "impossible stream"),
    (header(n_symbols=0), "impossible stream"),
    (header(width=17), "block table width 17"),
    (header(n_symbols=1 << 60, n_bits=1 << 62), "truncated"),  # huge sizes in a tiny buffer: no allocation
])
def test_corrupt_headers_are_rejected(data: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        HuffmanStream.from_bytes(data)


def test_lengths_violating_kraft_are_rejected() -> None:
    data = bytearray(encode(np.array([0, 1, 2, 2]), 3).to_bytes())
    data[29] = 0b00001000  # lengths 1, 1 (bits 00001 00001 ...): with the third code, sum 2**-l > 1
    with pytest.raises(ValueError, match="Kraft"):
        HuffmanStream.from_bytes(bytes(data))


def test_bit_pattern_outside_an_incomplete_code_is_rejected() -> None:
    stream = encode(np.zeros(9, np.int64), 1)  # one symbol: code "0", so "1" starts no code
    corrupt = HuffmanStream(stream.lengths, 9, 9, b"\x08\x00", stream.block_size, stream.block_bits)
    with pytest.raises(ValueError, match="starts no code|ends at bit"):
        decode(corrupt)


def test_corrupt_block_table_is_rejected() -> None:
    stream = encode(gaussian_symbols(5000, 8), 8)
    for delta, match in ((1, "ends at bit|block table"), (100_000, "block table")):
        bits = stream.block_bits.astype(np.int64)
        bits[1] += delta
        corrupt = HuffmanStream(stream.lengths, stream.n_symbols, stream.n_bits, stream.payload,
                                stream.block_size, bits)
        with pytest.raises(ValueError, match=match):
            decode(corrupt)


def test_inconsistent_dataclass_fields_are_rejected() -> None:
    s = encode(np.array([0, 1, 1, 2]), 3)
    cases = [({"n_bits": s.n_bits + 64}, "payload has"), ({"n_symbols": 0}, "impossible"),
             ({"payload": b"\xff"}, "padding bits"), ({"block_bits": np.ones(2, np.uint16)}, "block_bits must"),
             ({"lengths": np.full(3, 17, np.uint8)}, "code lengths must be in 0..16"),
             ({"lengths": np.array([-1, 1, 1], np.int8)}, "code lengths must be in 0..16"),
             ({"lengths": np.array([1.0, 2.0, 2.0])}, "1-D integers")]
    for change, match in cases:
        fields = {"lengths": s.lengths, "n_symbols": s.n_symbols, "n_bits": s.n_bits, "payload": s.payload,
                  "block_size": s.block_size, "block_bits": s.block_bits} | change
        with pytest.raises(ValueError, match=match):
            decode(HuffmanStream(**fields))


def test_random_garbage_payloads_never_hang() -> None:
    rng = np.random.default_rng(0)
    stream = encode(gaussian_symbols(2500, 6), 6)
    for _ in range(40):
        payload = bytearray(rng.integers(0, 256, len(stream.payload), dtype=np.uint8).tobytes())
        payload[-1] &= (0xFF << (-stream.n_bits % 8)) & 0xFF  # keep the padding bits zero
        garbage = HuffmanStream(stream.lengths, stream.n_symbols, stream.n_bits, bytes(payload),
                                stream.block_size, stream.block_bits)
        try:
            out = decode(garbage)
        except ValueError as err:
            assert "corrupt" in str(err)
        else:  # a lucky draw: every block decoded to exactly its declared bits
            assert out.shape == (stream.n_symbols,) and out.min() >= 0 and out.max() < 6


@pytest.mark.parametrize(("symbols", "alphabet", "match"), [
    (np.array([0, 5]), 5, "symbol 5 is outside"),
    (np.array([-1, 0]), 5, "symbol -1 is outside"),
    (np.array([0.5]), 5, "integer array"),
    (np.zeros((2, 2), np.int64), 5, "1-D"),
    (np.array([0]), 0, "alphabet_size must be"),
    (np.array([0]), (1 << 16) + 1, "alphabet_size must be"),
])
def test_encode_rejects_bad_input(symbols: np.ndarray, alphabet: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encode(symbols, alphabet)


@pytest.mark.parametrize(("counts", "match"), [(np.array([1, -2]), "non-negative"),
                                               (np.ones((2, 2), np.int64), "1-D"),
                                               (np.array([0.5, 1.0]), "integer")])
def test_code_lengths_rejects_bad_counts(counts: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        code_lengths(counts)
