"""service.multipart_form splits the plain forms clients send, exactly as Starlette parses them, and leaves every
other body to Starlette."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest
from python_multipart.multipart import parse_options_header
from starlette.datastructures import UploadFile
from starlette.requests import Request

from service import multipart_form
from service.multipart_form import Item

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 3  # any bytes: CR, LF and hyphens included
BOUNDARY = "d0c5a9e7b1"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def httpx_form(data: dict[str, str], files: list[tuple[str, tuple[str, bytes, str]]]) -> tuple[bytes, str]:
    """A form as httpx (and so as most Python clients) writes it."""
    request = httpx.Request("POST", "http://test/encode", data=data, files=files)
    return request.read(), request.headers["content-type"]


def written(*parts: tuple[str, bytes], boundary: str = BOUNDARY, end: bytes = b"\r\n") -> bytes:
    """A body with the given part headers and data, framed as the RFC says."""
    body = b"".join(f"--{boundary}\r\n{headers}\r\n\r\n".encode() + data + b"\r\n" for headers, data in parts)
    return body + f"--{boundary}--".encode() + end


def field(name: str, value: str) -> tuple[str, bytes]:
    return f'Content-Disposition: form-data; name="{name}"', value.encode()


def file(name: str, data: bytes = PNG, filename: str = "x.png") -> tuple[str, bytes]:
    return f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\nContent-Type: image/png', data


def starlette(body: bytes, content_type: str, *, max_files: int = 64, max_fields: int = 16) -> list[Item] | Exception:
    """What Starlette's own parser makes of the body: its items, or what it raised."""

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def items() -> list[Item]:
        request = Request({"type": "http", "method": "POST", "headers": [(b"content-type", content_type.encode())]}, receive)
        form = await request.form(max_files=max_files, max_fields=max_fields)
        try:
            return [(k, await v.read() if isinstance(v, UploadFile) else v) for k, v in form.multi_items()]
        finally:
            await form.close()

    try:
        return asyncio.run(items())
    except Exception as exc:
        return exc


def parse(body: bytes, content_type: str = CONTENT_TYPE, *, max_files: int = 64, max_fields: int = 16) -> list[Item] | None:
    return multipart_form.parse(body, content_type, max_files=max_files, max_fields=max_fields)


PLAIN_FORMS = {
    "httpx, one image": httpx_form({"model": "mnist"}, [("image", ("digit.png", PNG, "image/png"))]),
    "httpx, three images and invert": httpx_form(
        {"model": "faces", "invert": "false"}, [("image", (f"{i}.png", PNG[i:], "image/png")) for i in range(3)]
    ),
    "httpx, text that is not ASCII": httpx_form({"model": "modèle ☃"}, [("image", ("é; \"q\".png", PNG, "image/png"))]),
    "an empty file and an empty field": (written(field("model", ""), file("image", b"")), CONTENT_TYPE),
    "no CRLF after the last delimiter": (written(field("model", "mnist"), file("image"), end=b""), CONTENT_TYPE),
    "a quoted boundary, utf-8 declared": (written(field("model", "m"), file("image")), f'multipart/form-data; boundary="{BOUNDARY}"; charset=UTF-8'),
    "a repeated field and a field that is a file": (
        written(field("model", "a"), file("model"), field("model", "b"), field("image", "not a file"), file("image")),
        CONTENT_TYPE,
    ),
    "headers in another case, extra headers": (
        written(('CONTENT-DISPOSITION:form-data; name="model"\r\nX-Other: 1', b"mnist"), file("image")),
        CONTENT_TYPE,
    ),
}


@pytest.mark.parametrize("form", PLAIN_FORMS.values(), ids=PLAIN_FORMS.keys())
def test_a_plain_form_is_split_as_starlette_parses_it(form: tuple[bytes, str]) -> None:
    body, content_type = form
    items = parse(body, content_type)
    assert items is not None
    assert items == starlette(body, content_type)


@pytest.mark.parametrize("disposition", [
    b'form-data; name="image"; filename="0.png"', b'form-data; name="model"', b'form-data; name=""; filename=""',
    b'form-data; name="a;b"; filename="x; y=1.png"', 'form-data; name="modèle ☃"; filename="é.png"'.encode(),
])
def test_a_plain_content_disposition_is_read_as_python_multipart_reads_it(disposition: bytes) -> None:
    plain = multipart_form.PLAIN_DISPOSITION.fullmatch(disposition)
    _, options = parse_options_header(disposition)
    assert plain is not None
    assert (plain[1], plain[2] is not None) == (options.get(b"name"), b"filename" in options)


LEFT_TO_STARLETTE = {
    "a preamble": (b"preamble\r\n" + written(field("model", "m")), CONTENT_TYPE),
    "LF line ends": (written(field("model", "m"), file("image")).replace(b"\r\n", b"\n"), CONTENT_TYPE),
    "an epilogue": (written(field("model", "m"), end=b"\r\nepilogue"), CONTENT_TYPE),
    "no closing delimiter": (written(field("model", "m"))[: -len(f"--{BOUNDARY}--\r\n")], CONTENT_TYPE),
    "no Content-Disposition": (written(("Content-Type: text/plain", b"m")), CONTENT_TYPE),
    "no name": (written(("Content-Disposition: form-data", b"m")), CONTENT_TYPE),
    "no headers": (written(("", b"m")), CONTENT_TYPE),
    "two Content-Dispositions": (written((field("a", "")[0] + "\r\n" + field("b", "")[0], b"m")), CONTENT_TYPE),
    "a folded header": (written(('Content-Disposition: form-data;\r\n name="model"', b"m")), CONTENT_TYPE),
    "a header name with a space": (written((field("model", "")[0] + "\r\nX Bad: 1", b"m")), CONTENT_TYPE),
    "nine headers": (written((field("model", "")[0] + "\r\nX: 1" * 8, b"m")), CONTENT_TYPE),
    "a field that is not UTF-8": (written(("Content-Disposition: form-data; name=\"model\"", "é".encode("latin-1"))), CONTENT_TYPE),
    "a name that is not UTF-8": (written(field("model", "m")).replace(b"model", "é".encode("latin-1")), CONTENT_TYPE),
    "latin-1 declared": (written(field("model", "m")), CONTENT_TYPE + "; charset=latin-1"),
    "no boundary": (written(field("model", "m")), "multipart/form-data"),
    "another boundary": (written(field("model", "m"), boundary="other"), CONTENT_TYPE),
    "a boundary over 70 bytes": (written(field("model", "m"), boundary="b" * 71), "multipart/form-data; boundary=" + "b" * 71),
    "a delimiter followed by something else": (written(field("model", "m")).replace(b"m\r\n--", b"m\r\n--" + BOUNDARY.encode() + b"x\r\n--"), CONTENT_TYPE),
    "more files than allowed": (written(field("model", "m"), file("image"), file("image")), CONTENT_TYPE),
    "more fields than allowed": (written(*(field(f"f{i}", "v") for i in range(3))), CONTENT_TYPE),
    "a field over 1 MiB": (written(field("model", "m" * (1024 * 1024 + 1))), CONTENT_TYPE),
    "not a form": (written(field("model", "m")), f"multipart/mixed; boundary={BOUNDARY}"),
}


@pytest.mark.parametrize("form", LEFT_TO_STARLETTE.values(), ids=LEFT_TO_STARLETTE.keys())
def test_any_other_body_is_left_to_starlette(form: tuple[bytes, str]) -> None:
    body, content_type = form
    assert parse(body, content_type, max_files=1, max_fields=2) is None


def test_whatever_it_splits_of_a_mangled_form_starlette_parses_the_same() -> None:
    """Fuzzed: bytes changed, cut, repeated or inserted, mostly around the form's structure."""
    body = written(field("model", "faces"), field("invert", "auto"), file("image", PNG[:40]), file("image", b"-\r\n-"))
    tokens = [b"\r\n", b"\r\n\r\n", b"--", f"--{BOUNDARY}".encode(), b":", b";", b'"', b"name=", b"filename=", b" ", b"\xff"]
    rng = random.Random(7)
    split = 0
    for _ in range(1500):
        mangled = bytearray(body)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(mangled))
            op = rng.randrange(4)
            if op == 0:
                mangled[at] = rng.choice(b"\r\n-:;= \"a\xff")
            elif op == 1:
                del mangled[at : at + rng.randint(1, 12)]
            elif op == 2:
                mangled[at:at] = mangled[at : at + rng.randint(1, 12)]
            else:
                mangled[at:at] = rng.choice(tokens)
        items = parse(bytes(mangled), max_files=2, max_fields=2)
        if items is not None:
            split += 1
            assert items == starlette(bytes(mangled), CONTENT_TYPE, max_files=2, max_fields=2), bytes(mangled)
    assert split > 100  # the fuzzing kept many forms plain, so the comparison ran
