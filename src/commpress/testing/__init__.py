"""Test helpers that ship with commpress: codec checks, collective checks, a gloo runner.

``commpress.testing`` is public so that third-party codecs can be held to the
same contract as the built-in ones (``commpress.testing.suite`` holds the shared
test classes a codec's test file subclasses).
"""

from .checks import (
    SHAPES,
    check_bad_input,
    check_config,
    check_fast_matches_reference,
    check_golden,
    check_nonfinite,
    check_roundtrip,
    edge_values,
    gaussian,
    golden_digest,
    heavy_tailed,
    random_bits,
    structured,
    zeros,
)
from .collective import Report, assert_reports, override_tables, piece_bound, reduce_bound
from .dist import DistPool, RankDied, RemoteError, free_port

__all__ = [
    # codec checks
    "SHAPES",
    "check_bad_input",
    "check_config",
    "check_fast_matches_reference",
    "check_golden",
    "check_nonfinite",
    "check_roundtrip",
    "edge_values",
    "gaussian",
    "golden_digest",
    "heavy_tailed",
    "random_bits",
    "structured",
    "zeros",
    # collectives against plain torch.distributed
    "Report",
    "assert_reports",
    "override_tables",
    "piece_bound",
    "reduce_bound",
    # multi-process runner
    "DistPool",
    "RankDied",
    "RemoteError",
    "free_port",
]
