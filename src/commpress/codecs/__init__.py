"""Built-in codecs. Importing this package registers them all."""

from . import cast, chain  # noqa: F401
