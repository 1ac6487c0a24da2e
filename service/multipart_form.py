"""A multipart/form-data body, read whole and split in one pass, for the plain forms that clients send.

Starlette's form parser drives python-multipart's byte-level state machine, written in Python. For one /encode image
that took 164 us of event-loop time (212 us for a 15 KB face), more than the rest of the route. A body that is read
whole can be split on its delimiters with a few `bytes` calls instead. `parse` takes only the plain shape that browsers,
curl, requests and httpx write: the first delimiter at the start, CRLF line ends, at most 8 headers per part, a
Content-Disposition with a name, and UTF-8. For anything else it answers None, and the caller hands the body to
Starlette, so every unusual or malformed form gets the answer it got before. Where it answers, it gives what
Starlette's parser gives for the same body (tests/service/test_multipart_form.py holds it to that, fuzzed).
"""

from __future__ import annotations

import codecs
import re

from python_multipart.multipart import parse_options_header

# (name, value): a field's text, or a file's bytes; in the body's order, as Starlette's `FormData.multi_items()`.
Item = tuple[str, str | bytes]

# Where python-multipart or Starlette refuse a form (or where they might, in another version), they decide.
MAX_BOUNDARY_BYTES = 70  # RFC 2046's limit; python-multipart refuses over 256
MAX_HEADERS = 8  # per part, python-multipart's limit
MAX_HEADER_LINE_BYTES = 4096  # python-multipart refuses a line over 4,224
MAX_FIELD_BYTES = 1024 * 1024  # Starlette's max_part_size: a longer text field is its 400
TOKEN_CHARS = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # RFC 9110 header names
# The Content-Disposition that clients write, read without python-multipart's general parse (4 us a part, most of a
# part's time here): nothing quoted to unescape, no other parameter. Its name's bytes are the ones that parse gives.
PLAIN_DISPOSITION = re.compile(rb'form-data; name="([^"\\]*)"(; filename="[^"\\]*")?')


def parse(body: bytes, content_type: str, *, max_files: int, max_fields: int) -> list[Item] | None:
    """The form's items, or None where Starlette should parse it (an unusual shape, a malformed body, a limit)."""
    kind, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    charset = params.get(b"charset")
    if (
        kind != b"multipart/form-data" or not boundary or len(boundary) > MAX_BOUNDARY_BYTES
        or (charset is not None and not _is_utf8(charset))
    ):
        return None
    delimiter = b"\r\n--" + boundary
    if not body.startswith(delimiter[2:] + b"\r\n"):
        return None
    end = body.rfind(delimiter + b"--")
    if end < 0 or body[end + len(delimiter) + 2 :] not in (b"", b"\r\n"):
        return None
    items: list[Item] = []
    files = fields = 0
    for part in body[len(delimiter) : end].split(delimiter + b"\r\n"):
        if delimiter in part:  # a delimiter followed by anything but CRLF: python-multipart's call
            return None
        item = _part(part)
        if item is None:
            return None
        if isinstance(item[1], bytes):
            files += 1
        else:
            fields += 1
        if files > max_files or fields > max_fields:
            return None
        items.append(item)
    return items


def _part(part: bytes) -> Item | None:
    """One part (its headers, a blank line, its data) -> (name, text or bytes), or None if it is not plain."""
    head, blank, data = part.partition(b"\r\n\r\n")
    if not blank or not head:
        return None
    lines = head.split(b"\r\n")
    if len(lines) > MAX_HEADERS:
        return None
    disposition = None
    for line in lines:
        field, colon, value = line.partition(b":")
        if (
            not colon or not field or field.translate(None, TOKEN_CHARS) or len(line) > MAX_HEADER_LINE_BYTES
            or b"\r" in value or b"\n" in value  # a lone CR or LF: python-multipart's error
        ):
            return None
        if field.lower() == b"content-disposition":
            if disposition is not None:
                return None
            disposition = value.lstrip(b" ")  # python-multipart skips the spaces before a value, and only those
    if disposition is None:
        return None
    if plain := PLAIN_DISPOSITION.fullmatch(disposition):
        raw_name, is_file = plain[1], plain[2] is not None
    else:
        _, options = parse_options_header(disposition)
        raw_name, is_file = options.get(b"name"), b"filename" in options
    if raw_name is None:
        return None
    try:
        name = raw_name.decode()
        if is_file:
            return name, data
        return (name, data.decode()) if len(data) <= MAX_FIELD_BYTES else None
    except UnicodeDecodeError:  # Starlette falls back to latin-1: let it
        return None


def _is_utf8(charset: bytes) -> bool:
    try:
        return codecs.lookup(charset.decode("latin-1")).name == "utf-8"
    except LookupError:
        return False
