"""commpress: compressed collectives for torch.distributed.

Example::

    import commpress
    codec = commpress.get_codec("int8")
    packet = codec.encode(tensor)
    approx = codec.decode(packet)
"""

from __future__ import annotations

from . import codecs as _codecs  # noqa: F401  (registers the built-in codecs)
from . import wire
from .codec import Codec, Packet, PacketMeta
from .engine import Engine, Handle
from .errors import (
    CodecMismatchError,
    CollectiveError,
    CommpressError,
    ConfigError,
    UnknownCodecError,
    UnsupportedDeviceError,
    UnsupportedDtypeError,
    WireError,
)
from .feedback import ErrorFeedback
from .policy import Policy
from .registry import get_codec, list_codecs, register_codec
from .stats import reset_stats, stats

__version__ = "0.1.0"

# The faces come last: each builds on the core imported above.
from . import distributed, hooks, moe, moe_internode  # noqa: E402
from .patch import is_patched, patch, unpatch  # noqa: E402

# fmt: off
__all__ = [
    # codecs
    "Codec", "Packet", "PacketMeta", "get_codec", "list_codecs", "register_codec",
    "ErrorFeedback", "wire",
    # collectives
    "distributed", "Policy", "Engine", "Handle", "stats", "reset_stats",
    # drop-in
    "patch", "unpatch", "is_patched", "hooks", "moe", "moe_internode",
    # errors
    "CommpressError", "ConfigError", "UnknownCodecError", "UnsupportedDtypeError",
    "UnsupportedDeviceError", "WireError", "CodecMismatchError", "CollectiveError",
]
# fmt: on
