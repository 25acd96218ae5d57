"""``commpress.units``: the one size parser and formatter, and the one bool parser."""

from __future__ import annotations

import pytest

from commpress.units import format_size, parse_bool, parse_size

# Every input the three former parsers (policy's COMMPRESS_MIN_BYTES, ``commpress codecs
# --size``, ``commpress bench -b/-e``) accepted in their tests, with its meaning.
ACCEPTED = [
    ("1K", 1024),
    ("4M", 4 << 20),
    ("64MiB", 64 << 20),
    ("1G", 1 << 30),
    ("100", 100),
    ("64kb", 64 << 10),
    ("1.5M", 3 << 19),
    ("16 MiB", 16 << 20),
    ("7B", 7),
    ("8K", 8192),
    ("8k", 8192),
    ("256M", 256 << 20),
    ("4096", 4096),
    ("1MiB", 1 << 20),
    ("2KB", 2048),
    ("0.5K", 512),
    ("64k", 64 << 10),
    ("4k", 4 << 10),
    ("0", 0),
    (" 4K ", 4096),
    ("1T", 1 << 40),
]


@pytest.mark.parametrize("text, nbytes", ACCEPTED)
def test_parse_size(text, nbytes):
    assert parse_size(text) == nbytes


@pytest.mark.parametrize(
    "text",
    [
        "",
        "abc",
        "-1",
        "0.1",
        "MiB",
        "1iB",
        "1 K M",
        "1e6",
        "-1K",
        "12Q",
        "K",
        "0.3K",
        "1.5",
        "lots",
        "inf",
        "nan",
    ],
)
def test_parse_size_rejects_and_names_the_text_and_the_grammar(text):
    with pytest.raises(ValueError, match="size") as info:
        parse_size(text)
    assert repr(text) in str(info.value)
    assert "powers of 1024" in str(info.value)


@pytest.mark.parametrize("text", ["0", "0K"])
def test_parse_size_minimum(text):
    assert parse_size(text) == 0
    with pytest.raises(ValueError, match="at least 1 bytes"):
        parse_size(text, minimum=1)


@pytest.mark.parametrize(
    "nbytes, text", [(7, "7 B"), (64 << 10, "64 KiB"), (3 << 19, "1.5 MiB"), (1 << 30, "1 GiB")]
)
def test_format_size(nbytes, text):
    assert format_size(nbytes) == text


def test_exact_format_size_inverts_parse_size():
    for text in ("8K", "256M", "1G", "100B", "1536K"):
        assert format_size(parse_size(text), exact=True) == text


@pytest.mark.parametrize("text", ["1", "true", "True", "YES", "on", " on "])
def test_parse_bool_true(text):
    assert parse_bool(text) is True


@pytest.mark.parametrize("text", ["0", "false", "FALSE", "no", "off"])
def test_parse_bool_false(text):
    assert parse_bool(text) is False


@pytest.mark.parametrize("text", ["", "2", "maybe", "y"])
def test_parse_bool_rejects(text):
    with pytest.raises(ValueError, match="1/0, true/false, yes/no or on/off"):
        parse_bool(text)


def test_env_seconds():
    from commpress.errors import ConfigError
    from commpress.units import env_seconds

    assert env_seconds("X_S", 5.0, "0: off", {}) == 5.0
    assert env_seconds("X_S", 5.0, "0: off", {"X_S": " 0.5 "}) == 0.5
    assert env_seconds("X_S", 5.0, "0: off", {"X_S": "0"}) == 0
    for bad in ("-1", "soon", "nan"):
        with pytest.raises(ConfigError, match=r"X_S=.*seconds >= 0 \(0: off\)"):
            env_seconds("X_S", 5.0, "0: off", {"X_S": bad})
