"""AWS event-stream framing (``application/vnd.amazon.eventstream``): encode and decode.

Bedrock's streaming operations answer with a sequence of binary frames::

    total_len u32 | headers_len u32 | prelude_crc u32 | headers | payload | message_crc u32

all big-endian, CRC32 (zlib polynomial) over the 8 prelude bytes and over everything before the
message CRC respectively.  botocore ships a decoder but no encoder; the simulator needs the
encoder and the proxy needs an *incremental* decoder that it can feed every upstream chunk as it
passes through (to read token usage) without copying the stream or looping per byte in Python.
"""

from __future__ import annotations

import struct
from binascii import crc32
from collections.abc import Mapping
from dataclasses import dataclass

import orjson

__all__ = [
    "MAX_HEADERS_LENGTH",
    "MAX_PAYLOAD_LENGTH",
    "EventStreamDecoder",
    "EventStreamError",
    "HeaderValue",
    "Message",
    "encode_message",
    "event_frame",
    "exception_frame",
]

#: botocore refuses frames whose headers exceed 128 KiB ...
MAX_HEADERS_LENGTH = 128 * 1024
#: ... or whose payload exceeds 24 MiB; the decoder enforces the same limits.
MAX_PAYLOAD_LENGTH = 24 * 1024 * 1024

HeaderValue = str | bytes | bool | int

_PRELUDE = struct.Struct(">III")  # total length, headers length, prelude CRC
_PRELUDE_LEN = 12
_CRC = struct.Struct(">I")
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_HEADER_TYPE_AND_LEN = struct.Struct(">BH")  # type byte + u16 length (string / bytes)
_INT32_HEADER = struct.Struct(">Bi")
# Frame overhead besides headers and payload: prelude (12) + message CRC (4).
_OVERHEAD = _PRELUDE_LEN + 4

_HEADER_CACHE_SIZE = 64  # shared by every decoder in the process

# Header value types (the wire's type byte).
_TRUE, _FALSE, _BYTE, _SHORT, _INT, _LONG, _BYTES, _STRING, _TIMESTAMP, _UUID = range(10)
_FIXED_INTS: dict[int, struct.Struct] = {
    _BYTE: struct.Struct(">b"),
    _SHORT: struct.Struct(">h"),
    _INT: struct.Struct(">i"),
    _LONG: struct.Struct(">q"),
    _TIMESTAMP: struct.Struct(">q"),  # milliseconds since the epoch, surfaced as an int
}


class EventStreamError(ValueError):
    """A frame is corrupt (bad CRC, impossible lengths, unknown header type) or too large."""


@dataclass(frozen=True, slots=True)
class Message:
    """One decoded frame: its headers (name → typed value) and raw payload."""

    headers: dict[str, HeaderValue]
    payload: bytes


def _encode_header(name: str, value: HeaderValue) -> bytes:
    raw_name = name.encode("utf-8")
    if not 0 < len(raw_name) < 256:
        raise ValueError(f"event-stream header name must be 1..255 bytes: {name!r}")
    prefix = _U8.pack(len(raw_name)) + raw_name
    # bool before int: bool is a subclass of int but has its own wire types.
    if isinstance(value, bool):
        return prefix + _U8.pack(_TRUE if value else _FALSE)
    if isinstance(value, int):
        if not -(2**31) <= value < 2**31:
            raise ValueError(f"event-stream int header {name!r} out of int32 range: {value}")
        return prefix + _INT32_HEADER.pack(_INT, value)
    if isinstance(value, str):
        raw, kind = value.encode("utf-8"), _STRING
    elif isinstance(value, bytes):
        raw, kind = value, _BYTES
    else:  # pragma: no cover - guarded by the type signature
        raise TypeError(f"unsupported event-stream header type for {name!r}: {type(value)!r}")
    if len(raw) > 0xFFFF:
        raise ValueError(f"event-stream header {name!r} value longer than 65535 bytes")
    return prefix + _HEADER_TYPE_AND_LEN.pack(kind, len(raw)) + raw


def _frame(raw_headers: bytes, payload: bytes) -> bytes:
    prelude = struct.pack(">II", len(raw_headers) + len(payload) + _OVERHEAD, len(raw_headers))
    body = prelude + _CRC.pack(crc32(prelude)) + raw_headers + payload
    return body + _CRC.pack(crc32(body))


def encode_message(headers: Mapping[str, HeaderValue], payload: bytes) -> bytes:
    """Encode one frame. ``str`` headers are type 7, ``bytes`` 6, ``bool`` 0/1, ``int`` int32 (4).

    Raises ``ValueError`` for a value the wire cannot carry (name > 255 bytes, int outside int32,
    string/bytes > 65535 bytes, headers or payload over botocore's limits).
    """
    raw_headers = b"".join([_encode_header(k, v) for k, v in headers.items()])
    if len(raw_headers) > MAX_HEADERS_LENGTH:
        raise ValueError(f"event-stream headers of {len(raw_headers)} bytes exceed 128 KiB")
    if len(payload) > MAX_PAYLOAD_LENGTH:
        raise ValueError(f"event-stream payload of {len(payload)} bytes exceeds 24 MiB")
    return _frame(raw_headers, payload)


# The headers of every event and exception frame differ only in one value; encoding the
# constant part once keeps the simulator's per-delta cost to a couple of concatenations.
_EVENT_PREFIX = _encode_header(":message-type", "event")
_EXCEPTION_PREFIX = _encode_header(":message-type", "exception")
_JSON_CONTENT_TYPE = _encode_header(":content-type", "application/json")


def event_frame(event_type: str, payload: bytes) -> bytes:
    """An event frame: ``:message-type=event``, ``:event-type``, JSON ``:content-type``."""
    headers = _EVENT_PREFIX + _encode_header(":event-type", event_type) + _JSON_CONTENT_TYPE
    return _frame(headers, payload)


def exception_frame(exception_type: str, message: str) -> bytes:
    """A modelled exception frame, e.g. ``exception_frame("throttlingException", "...")``.

    ``exception_type`` is the lower-camel member name of the stream union, which is what
    botocore matches to raise ``EventStreamError`` with that code.
    """
    headers = (
        _EXCEPTION_PREFIX + _encode_header(":exception-type", exception_type) + _JSON_CONTENT_TYPE
    )
    return _frame(headers, orjson.dumps({"message": message}))


def _decode_headers(data: bytes) -> dict[str, HeaderValue]:
    headers: dict[str, HeaderValue] = {}
    pos, end = 0, len(data)
    try:
        while pos < end:
            name_len = data[pos]
            name = data[pos + 1 : pos + 1 + name_len].decode("utf-8")
            pos += 1 + name_len
            kind = data[pos]
            pos += 1
            value: HeaderValue
            if kind in (_TRUE, _FALSE):
                value = kind == _TRUE
            elif kind in (_STRING, _BYTES):
                (length,) = _U16.unpack_from(data, pos)
                raw = data[pos + 2 : pos + 2 + length]
                if len(raw) != length:
                    raise EventStreamError("event-stream header value runs past the headers")
                pos += 2 + length
                value = raw.decode("utf-8") if kind == _STRING else raw
            elif kind == _UUID:
                value = data[pos : pos + 16]
                if len(value) != 16:
                    raise EventStreamError("event-stream uuid header runs past the headers")
                pos += 16
            elif kind in _FIXED_INTS:
                fmt = _FIXED_INTS[kind]
                (value,) = fmt.unpack_from(data, pos)
                pos += fmt.size
            else:
                raise EventStreamError(f"unknown event-stream header type {kind}")
            headers[name] = value
    except (IndexError, struct.error, UnicodeDecodeError) as exc:
        raise EventStreamError(f"malformed event-stream headers: {exc}") from exc
    return headers


class EventStreamDecoder:
    """Incremental decoder: ``feed()`` any slice of the stream, get back the complete frames.

    Both CRCs are verified and botocore's size limits enforced; any violation raises
    :class:`EventStreamError`, after which the decoder stays failed (a byte stream cannot be
    resynchronised once framing is lost) and every later ``feed()`` raises the same error.
    """

    __slots__ = ("_buffer", "_error")

    # Streams repeat a handful of header blocks (every chunk event of every stream carries the
    # same three headers), so decoded headers are cached by their raw bytes: it halves decode
    # cost. One cache for all decoders: thousands of held streams need not hold one each.
    _header_cache: dict[bytes, dict[str, HeaderValue]] = {}

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._error: EventStreamError | None = None

    @property
    def pending(self) -> int:
        """Bytes held back because they do not yet make a complete frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Message]:
        """Append ``data`` and return every frame it completes (possibly none)."""
        if self._error is not None:
            raise self._error
        buf = self._buffer
        buf += data
        messages: list[Message] = []
        pos = 0
        try:
            while len(buf) - pos >= _PRELUDE_LEN:
                frame_len = self._check_prelude(buf, pos)
                if len(buf) - pos < frame_len:
                    break
                messages.append(self._decode_frame(buf, pos, frame_len))
                pos += frame_len
        except EventStreamError as exc:
            self._error = exc
            buf.clear()
            raise
        if pos:
            # One compaction per feed, not per frame: slicing a bytearray's head is a memmove.
            del buf[:pos]
        return messages

    @staticmethod
    def _check_prelude(buf: bytearray, pos: int) -> int:
        total_len, headers_len, prelude_crc = _PRELUDE.unpack_from(buf, pos)
        if crc32(buf[pos : pos + 8]) != prelude_crc:
            raise EventStreamError("event-stream prelude CRC mismatch")
        if headers_len > MAX_HEADERS_LENGTH:
            raise EventStreamError(f"event-stream headers of {headers_len} bytes exceed 128 KiB")
        payload_len = total_len - headers_len - _OVERHEAD
        if payload_len < 0:
            raise EventStreamError(f"event-stream frame length {total_len} is impossible")
        if payload_len > MAX_PAYLOAD_LENGTH:
            raise EventStreamError(f"event-stream payload of {payload_len} bytes exceeds 24 MiB")
        return int(total_len)

    def _decode_frame(self, buf: bytearray, pos: int, frame_len: int) -> Message:
        end = pos + frame_len
        with memoryview(buf) as view:
            (message_crc,) = _CRC.unpack_from(view, end - 4)
            if crc32(view[pos : end - 4]) != message_crc:
                raise EventStreamError("event-stream message CRC mismatch")
            (headers_len,) = _CRC.unpack_from(view, pos + 4)
            headers_start = pos + _PRELUDE_LEN
            payload_start = headers_start + headers_len
            raw_headers = bytes(view[headers_start:payload_start])
            payload = bytes(view[payload_start : end - 4])
        headers = self._header_cache.get(raw_headers)
        if headers is None:
            headers = _decode_headers(raw_headers)
            if len(self._header_cache) >= _HEADER_CACHE_SIZE:
                self._header_cache.clear()
            self._header_cache[raw_headers] = headers
        # A copy, so a caller mutating one message's headers cannot alter the next message's.
        return Message(dict(headers), payload)
