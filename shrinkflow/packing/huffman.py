"""Canonical Huffman coding and fixed-width bit packing of integer streams, in numpy.

Why our own: Deep Compression's last step Huffman-codes the weight-index and
position streams. The maintained Python entropy coders we know of either write
their own container (zlib/lzma/zstd: byte-oriented LZ + Huffman, no control over
the alphabet, and they lose to a symbol-level code on 4–6-bit index streams) or
are pure-Python per-bit libraries far too slow for 10^5–10^6 symbols. A canonical
code needs only its code lengths in the file, which keeps the
table overhead small (4 bits per symbol) for the ≤ 256-symbol alphabets used here.

Bit order: most significant bit first, as ``np.packbits`` writes it.
"""

from __future__ import annotations

import heapq

import numpy as np

#: Longest code we emit (fits the 4-bit code-length table); decoding peeks this many
#: bits at every bit position.
MAX_CODE_LENGTH = 15


def code_lengths(counts: np.ndarray, max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Huffman code lengths for symbol ``counts`` (0 for absent symbols), at most ``max_length``.

    A lone symbol gets length 1 (a code needs at least one bit per symbol here, so
    the decoder can count symbols). Over-long codes are avoided by flattening the
    counts and recomputing, the simple fix used by several deflate encoders.
    """
    counts = np.asarray(counts, dtype=np.int64)
    lengths = np.zeros(len(counts), dtype=np.int64)
    present = np.flatnonzero(counts)
    if len(present) == 0:
        return lengths
    if len(present) == 1:
        lengths[present] = 1
        return lengths
    work = counts.copy()
    while True:
        heap = [(int(work[s]), i, [int(s)]) for i, s in enumerate(present)]
        heapq.heapify(heap)
        depth = np.zeros(len(counts), dtype=np.int64)
        tie = len(heap)
        while len(heap) > 1:
            c1, _, s1 = heapq.heappop(heap)
            c2, _, s2 = heapq.heappop(heap)
            merged = s1 + s2
            depth[merged] += 1
            heapq.heappush(heap, (c1 + c2, tie, merged))
            tie += 1
        if depth.max() <= max_length:
            return depth
        work = np.where(work > 0, work // 2 + 1, 0)


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical codes for given lengths: shorter codes first, then by symbol."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(len(lengths), dtype=np.int64)
    order = sorted((int(l), s) for s, l in enumerate(lengths) if l > 0)
    code, prev = 0, 0
    for length, s in order:
        code <<= length - prev
        codes[s] = code
        code += 1
        prev = length
    return codes


def _pack_bits(values: np.ndarray, widths: np.ndarray) -> bytes:
    """Concatenate ``values[i]`` written in ``widths[i]`` bits, MSB first, zero-padded to bytes."""
    total = int(widths.sum())
    if total == 0:
        return b""
    starts = np.cumsum(widths) - widths
    rep_val = np.repeat(values, widths)
    rep_w = np.repeat(widths, widths)
    offs = np.arange(total, dtype=np.int64) - np.repeat(starts, widths)
    bits = ((rep_val >> (rep_w - 1 - offs)) & 1).astype(np.uint8)
    return np.packbits(bits).tobytes()


def pack_fixed(symbols: np.ndarray, width: int) -> bytes:
    """Write every symbol in ``width`` bits."""
    symbols = np.asarray(symbols, dtype=np.int64)
    return _pack_bits(symbols, np.full(len(symbols), width, dtype=np.int64))


def unpack_fixed(data: bytes, n: int, width: int) -> np.ndarray:
    """Inverse of ``pack_fixed``."""
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: n * width]
    if len(bits) < n * width:
        raise ValueError(f"fixed-width stream holds {len(bits)} bits, {n * width} needed")
    weights = (1 << np.arange(width - 1, -1, -1)).astype(np.int64)
    return bits.reshape(n, width).astype(np.int64) @ weights


def huffman_encode(symbols: np.ndarray, n_symbols: int) -> tuple[np.ndarray, bytes]:
    """Return (code lengths per symbol 0..n_symbols-1, packed bits)."""
    symbols = np.asarray(symbols, dtype=np.int64)
    lengths = code_lengths(np.bincount(symbols, minlength=n_symbols))
    codes = canonical_codes(lengths)
    return lengths, _pack_bits(codes[symbols], lengths[symbols])


def huffman_decode(lengths: np.ndarray, data: bytes, n: int) -> np.ndarray:
    """Decode ``n`` symbols written by ``huffman_encode`` with these code ``lengths``.

    Every bit position is looked up at once (peek ``L`` bits → symbol, length);
    only the walk from one code to the next is a Python loop over ``n`` steps.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    L = int(lengths.max())
    if L <= 0 or L > MAX_CODE_LENGTH:
        raise ValueError(f"invalid Huffman code lengths (longest {L})")
    codes = canonical_codes(lengths)
    # Kraft check: an over-full table means a corrupt file, not a code.
    if sum(2.0 ** -int(l) for l in lengths if l > 0) > 1.0 + 1e-12:
        raise ValueError("invalid Huffman code lengths (over-subscribed)")
    table_sym = np.full(1 << L, -1, dtype=np.int64)
    table_len = np.zeros(1 << L, dtype=np.int64)
    for s in np.flatnonzero(lengths):
        l = int(lengths[s])
        lo = int(codes[s]) << (L - l)
        table_sym[lo : lo + (1 << (L - l))] = s
        table_len[lo : lo + (1 << (L - l))] = l
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8)).astype(np.int64)
    nbits = len(bits)
    padded = np.concatenate([bits, np.zeros(L, dtype=np.int64)])
    window = np.zeros(nbits, dtype=np.int64)
    for j in range(L):
        window = (window << 1) | padded[j : j + nbits]
    step = table_len[window]
    nxt = (np.arange(nbits, dtype=np.int64) + step).tolist()
    starts = [0] * n
    p = 0
    for i in range(n):
        if p >= nbits:
            raise ValueError(f"Huffman stream ends after {i} of {n} symbols")
        starts[i] = p
        p = nxt[p]
    if p > nbits:
        raise ValueError("Huffman stream ends inside a code")
    out = table_sym[window[np.asarray(starts, dtype=np.int64)]]
    if (out < 0).any():
        raise ValueError("Huffman stream holds a bit pattern that is no code")
    return out
