from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nexusd.wire.errors import TooLarge
from nexusd.wire.framing import FrameDecoder, encode_frame


def test_roundtrip_several_frames_in_one_feed() -> None:
    dec = FrameDecoder(1024)
    data = encode_frame(b"a") + encode_frame(b"") + encode_frame(b"xyz")
    assert dec.feed(data) == [b"a", b"", b"xyz"]
    assert dec.pending == 0


def test_partial_frame_waits_for_the_rest() -> None:
    dec = FrameDecoder(1024)
    frame = encode_frame(b"hello")
    assert dec.feed(frame[:3]) == []
    assert dec.feed(frame[3:7]) == []
    assert dec.pending == 7
    assert dec.feed(frame[7:]) == [b"hello"]
    assert dec.pending == 0


def test_oversized_length_is_refused_from_the_header_alone() -> None:
    dec = FrameDecoder(1024)
    # A 4 GiB announcement: refused after 4 bytes, nothing buffered.
    with pytest.raises(TooLarge):
        dec.feed(struct.pack(">I", 0xFFFFFFFF))
    assert dec.pending == 0
    with pytest.raises(TooLarge):  # poisoned: the stream is out of sync
        dec.feed(encode_frame(b"ok"))


def test_frame_exactly_at_the_limit_is_accepted() -> None:
    dec = FrameDecoder(8)
    assert dec.feed(encode_frame(b"12345678")) == [b"12345678"]
    with pytest.raises(TooLarge):
        dec.feed(encode_frame(b"123456789"))


@given(
    bodies=st.lists(st.binary(max_size=300), max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=30),
)
def test_any_chunking_yields_the_same_frames(bodies: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(b) for b in bodies)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    dec = FrameDecoder(1024)
    out: list[bytes] = []
    for a, b in itertools.pairwise(points):
        out += dec.feed(stream[a:b])
    assert out == bodies
    assert dec.pending == 0
