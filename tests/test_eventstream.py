"""Event-stream framing: our encoder against botocore's decoder, our decoder against both."""

from __future__ import annotations

import itertools
import struct
import uuid
from binascii import crc32

import orjson
import pytest
from botocore.eventstream import EventStreamBuffer
from hypothesis import given
from hypothesis import strategies as st

from proxy.eventstream import (
    MAX_HEADERS_LENGTH,
    MAX_PAYLOAD_LENGTH,
    EventStreamDecoder,
    EventStreamError,
    HeaderValue,
    Message,
    encode_message,
    event_frame,
    exception_frame,
)

header_names = st.text(min_size=1, max_size=40).filter(lambda s: len(s.encode()) < 256)
header_values = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=200),
    st.booleans(),
    st.integers(min_value=-(2**31), max_value=2**31 - 1),
)
headers_st = st.dictionaries(header_names, header_values, max_size=8)
payloads = st.binary(max_size=2000)


def _botocore_decode(data: bytes) -> list[tuple[dict[str, object], bytes]]:
    buffer = EventStreamBuffer()
    buffer.add_data(data)
    return [(message.headers, message.payload) for message in buffer]


@given(headers_st, payloads)
def test_round_trip_through_our_decoder(headers: dict[str, HeaderValue], payload: bytes) -> None:
    frame = encode_message(headers, payload)
    assert EventStreamDecoder().feed(frame) == [Message(headers, payload)]


@given(headers_st, payloads)
def test_botocore_decodes_our_frames(headers: dict[str, HeaderValue], payload: bytes) -> None:
    frame = encode_message(headers, payload)
    assert _botocore_decode(frame) == [(headers, payload)]


@given(
    st.lists(st.tuples(headers_st, payloads), min_size=1, max_size=5),
    st.lists(st.integers(min_value=0, max_value=20_000), max_size=10),
)
def test_any_split_points_yield_the_same_messages(
    messages: list[tuple[dict[str, HeaderValue], bytes]], cuts: list[int]
) -> None:
    stream = b"".join(encode_message(h, p) for h, p in messages)
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    decoder = EventStreamDecoder()
    decoded: list[Message] = []
    for start, end in itertools.pairwise(points):
        decoded += decoder.feed(stream[start:end])
    assert decoded == [Message(h, p) for h, p in messages]
    assert decoder.pending == 0


def test_byte_at_a_time_feeding_completes_each_frame_on_its_last_byte() -> None:
    frames = [
        event_frame("chunk", b'{"bytes":"e30="}'),
        exception_frame("throttlingException", "x"),
    ]
    decoder = EventStreamDecoder()
    completed_at = []
    stream = b"".join(frames)
    for i in range(len(stream)):
        if decoder.feed(stream[i : i + 1]):
            completed_at.append(i + 1)
    assert completed_at == [len(frames[0]), len(stream)]


def test_event_and_exception_frames_carry_bedrock_headers() -> None:
    [event, exc] = EventStreamDecoder().feed(
        event_frame("chunk", b"{}") + exception_frame("modelStreamErrorException", "boom ✨")
    )
    assert event.headers == {
        ":message-type": "event",
        ":event-type": "chunk",
        ":content-type": "application/json",
    }
    assert exc.headers == {
        ":message-type": "exception",
        ":exception-type": "modelStreamErrorException",
        ":content-type": "application/json",
    }
    assert orjson.loads(exc.payload) == {"message": "boom ✨"}


@pytest.mark.parametrize("offset", [2, 9, -2], ids=["prelude-length", "prelude-crc", "msg-crc"])
def test_corruption_is_detected_and_the_decoder_stays_failed(offset: int) -> None:
    frame = bytearray(event_frame("chunk", b'{"a":1}'))
    frame[offset] ^= 0x01
    decoder = EventStreamDecoder()
    with pytest.raises(EventStreamError, match="CRC"):
        decoder.feed(bytes(frame))
    with pytest.raises(EventStreamError):
        decoder.feed(event_frame("chunk", b"{}"))


def test_payload_corruption_fails_the_message_crc() -> None:
    frame = bytearray(event_frame("chunk", b'{"a":1}'))
    frame[-6] ^= 0xFF
    with pytest.raises(EventStreamError, match="message CRC"):
        EventStreamDecoder().feed(bytes(frame))


def _prelude(total: int, headers_len: int) -> bytes:
    head = struct.pack(">II", total, headers_len)
    return head + struct.pack(">I", crc32(head))


@pytest.mark.parametrize(
    ("total", "headers_len", "match"),
    [
        (MAX_HEADERS_LENGTH + 17, MAX_HEADERS_LENGTH + 1, "headers"),
        (MAX_PAYLOAD_LENGTH + 17, 0, "payload"),
        (10, 0, "impossible"),
    ],
)
def test_botocore_size_limits_are_enforced_from_the_prelude(
    total: int, headers_len: int, match: str
) -> None:
    # Refused on the prelude alone: the decoder must not buffer 24 MiB before saying no.
    with pytest.raises(EventStreamError, match=match):
        EventStreamDecoder().feed(_prelude(total, headers_len))


def _raw_frame(raw_headers: bytes, payload: bytes = b"") -> bytes:
    body = _prelude(len(raw_headers) + len(payload) + 16, len(raw_headers)) + raw_headers + payload
    return body + struct.pack(">I", crc32(body))


def test_every_header_type_decodes_like_botocore() -> None:
    ident = uuid.UUID("12345678-1234-5678-1234-567812345678").bytes
    raw = b"".join(
        [
            b"\x01a\x02" + struct.pack(">b", -3),
            b"\x01b\x03" + struct.pack(">h", -300),
            b"\x01c\x05" + struct.pack(">q", 2**40),
            b"\x01d\x08" + struct.pack(">q", 1_700_000_000_000),
            b"\x01e\x09" + ident,
        ]
    )
    frame = _raw_frame(raw, b"p")
    [message] = EventStreamDecoder().feed(frame)
    assert message.headers == {"a": -3, "b": -300, "c": 2**40, "d": 1_700_000_000_000, "e": ident}
    [(boto_headers, _)] = _botocore_decode(frame)
    assert boto_headers["a"] == -3 and boto_headers["c"] == 2**40


@pytest.mark.parametrize(
    "raw_headers",
    [b"\x01a\x0f", b"\x01a\x07\x00\x09abc", b"\x05ab"],
    ids=["unknown-type", "string-overruns", "name-overruns"],
)
def test_malformed_headers_are_errors(raw_headers: bytes) -> None:
    with pytest.raises(EventStreamError):
        EventStreamDecoder().feed(_raw_frame(raw_headers))


@pytest.mark.parametrize(
    ("headers", "payload"),
    [
        ({"n": 2**31}, b""),
        ({"x" * 256: "v"}, b""),
        ({"s": "v" * 70_000}, b""),
        ({}, b"\0" * (MAX_PAYLOAD_LENGTH + 1)),
    ],
    ids=["int-range", "long-name", "long-value", "big-payload"],
)
def test_encoder_refuses_what_the_wire_cannot_carry(
    headers: dict[str, HeaderValue], payload: bytes
) -> None:
    with pytest.raises(ValueError):
        encode_message(headers, payload)


def test_decoder_returns_fresh_header_dicts() -> None:
    decoder = EventStreamDecoder()
    first, second = decoder.feed(event_frame("chunk", b"1") + event_frame("chunk", b"2"))
    first.headers["mutated"] = True
    assert "mutated" not in second.headers
