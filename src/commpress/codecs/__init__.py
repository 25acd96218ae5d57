"""Built-in codecs. Importing this package registers them all."""

from . import cast, chain, lossless  # noqa: F401
