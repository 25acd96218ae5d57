"""Built-in codecs. Importing this package registers them all."""

from . import cast, chain, fp8, lossless, powersgd, quant, sparse  # noqa: F401
