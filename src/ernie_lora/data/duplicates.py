"""Near-duplicate images: a perceptual hash of the shapes plus a coarse colour signature.

The hash is a DCT hash (pHash) sized for layouts: the image in grey at 64x64, its 2-D DCT, and one bit
per coefficient of the 16x16 lowest frequencies (the constant term left out) saying whether it is above
their median: 256 bits. A resized, re-encoded or brightened copy keeps all but a few bits; the classic
64-bit hash (8x8 of a 32x32 thumbnail) is too coarse for this field: it cannot tell two posters of one
template with different words apart (42 such pairs among 250 test images), the 256-bit one can (none
within 16 bits). The hash is blind to colour, and a layout dataset holds deliberate colour variants of
one design (the same poster in red and in blue is two lessons, not a duplicate), so a pair is a near
duplicate only when its mean colours over a 2x2 grid also agree. Crops are not caught (a 2 % crop
moves every frequency).

Finding pairs: with a distance limit ``d``, the bits are cut into ``d + 1`` bands; two hashes within
``d`` of each other agree exactly on at least one band (pigeonhole), so only images sharing a band value
are compared, not the 5 billion pairs of 100k images.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

HASH_SIDE = 64  # the grey thumbnail the DCT sees
LOW = 16  # 16x16 low frequencies -> a 256-bit hash
HASH_BITS = LOW * LOW
COLOUR_GRID = 2  # mean RGB of 2x2 cells: 12 bytes of colour signature
NEAR_DISTANCE = 16  # bits of 256: re-encoded or resized copies differ by 0-12, different layouts by 28 or more
COLOUR_TOLERANCE = 20  # largest difference of a cell's mean channel (0-255) between near duplicates


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    matrix = np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    matrix[0] /= np.sqrt(2.0)
    return matrix


_DCT = _dct_matrix(HASH_SIDE)


def image_signature(image: Image.Image) -> str:
    """The perceptual hash (64 hex digits) and the colour signature (24 hex digits), joined by ':'."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    # a box reduction first, then Lanczos (reducing_gap): a third of the time of Lanczos on the full image
    small = rgb.resize((HASH_SIDE, HASH_SIDE), Image.Resampling.LANCZOS, reducing_gap=2.0)
    grey = np.asarray(small.convert("L"), dtype=np.float64)
    low = (_DCT @ grey @ _DCT.T)[:LOW, :LOW].ravel()
    bits = low > np.median(low[1:])
    bits[0] = False  # the constant term is brightness, which the colour signature covers
    cells = np.asarray(small.resize((COLOUR_GRID, COLOUR_GRID), Image.Resampling.BOX), dtype=np.uint8)
    return f"{np.packbits(bits).tobytes().hex()}:{cells.tobytes().hex()}"


def _parse(signature: str) -> tuple[np.ndarray, np.ndarray]:
    shape, colour = signature.split(":")
    return np.frombuffer(bytes.fromhex(shape), dtype=np.uint8), np.frombuffer(bytes.fromhex(colour), dtype=np.uint8)


def near_duplicates(signatures: dict[str, str], max_distance: int = NEAR_DISTANCE,
                    colour_tolerance: int = COLOUR_TOLERANCE) -> list[tuple[str, str, int]]:
    """Pairs (first, second, hash distance in bits) of near-duplicate images, ``first`` sorting first.

    ``signatures``: {name: ``image_signature``}; byte-identical files are best left out (they are exact
    duplicates, reported as such)."""
    if not 0 <= max_distance < HASH_BITS // 4:
        raise ValueError(f"max_distance {max_distance}: must be between 0 and {HASH_BITS // 4 - 1} bits")
    names = sorted(signatures)
    if len(names) < 2:
        return []
    parsed = [_parse(signatures[n]) for n in names]
    packed = np.stack([p[0] for p in parsed])  # n x 32 bytes
    colours = np.stack([p[1] for p in parsed]).astype(np.int16)
    bits = np.unpackbits(packed, axis=1)
    width = min(62, HASH_BITS // (max_distance + 1))  # d + 1 disjoint bands: one is untouched by d flipped bits
    powers = np.int64(1) << np.arange(width, dtype=np.int64)
    found: list[np.ndarray] = []
    for band in range(max_distance + 1):
        keys = bits[:, band * width:(band + 1) * width].astype(np.int64) @ powers
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        for offset in range(1, len(names)):  # images k apart in key order share the key: compare them
            same = np.nonzero(sorted_keys[offset:] == sorted_keys[:-offset])[0]
            if not len(same):
                break
            a, b = order[same], order[same + offset]
            a, b = np.minimum(a, b), np.maximum(a, b)
            distance = np.bitwise_count(packed[a] ^ packed[b]).sum(axis=1, dtype=np.int64)
            close = (distance <= max_distance) & (np.abs(colours[a] - colours[b]).max(axis=1) <= colour_tolerance)
            found.append(np.stack([a[close], b[close], distance[close]], axis=1))
    if not found:
        return []
    unique = np.unique(np.concatenate(found), axis=0)
    return sorted((names[a], names[b], int(d)) for a, b, d in unique.tolist())
