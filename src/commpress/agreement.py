"""Do all ranks run commpress with one policy? Asked through the rendezvous store.

A rank that is patched and a rank that is not call different backend
collectives for the same ``dist.all_reduce`` (a compressed all-reduce is a
descriptor exchange and two or three payload collectives), so both would
wait until the process-group timeout (30 minutes by default) -- or worse,
mix bytes. No collective can ask the question (the unpatched rank would never
answer it), but the key-value store every process group is built on can:

- ``publish``: a patched rank writes ``commpress/policy/<global rank>`` =
  ``"<generation>|<policy fingerprint>"`` into the default group's store, at
  ``patch()`` (when a process group exists), right after
  ``init_process_group`` (which ``patch()`` wraps) and at every policy change;
  ``unpatch()`` writes ``"<generation>|off"``. One ``store.set``, no collective.
- ``check(group)``: at its first patched call on a group (and before the DDP
  hook makes its twin group), a rank reads the keys of the group's other ranks
  (the peer only, for send/recv) and goes on only when every one holds its own
  fingerprint. A key that is missing (the rank never loaded commpress: it was
  started without ``commpress run`` or the start-up hook), ``off`` (it
  unpatched) or different (another policy) raises on every patched rank within
  `timeout_s` (default 60 s, ``COMMPRESS_AGREE_TIMEOUT``), naming each such
  rank and what it published. A different policy at the same generation is
  reported at once; otherwise the check waits, because the other rank may
  simply not have reached its ``patch()`` or its policy change yet.

After a successful check the result is kept per group and generation: later
calls cost one dictionary look-up. ``COMMPRESS_AGREE_TIMEOUT=0`` turns the
check off (for a job known to be uniform; an unpatched rank then hangs).

The fingerprint covers every `commpress.policy.Policy` field that changes
what goes on the wire: ranks that differ only in a field that does not
(none today) would still be told apart.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from .errors import CodecMismatchError, CollectiveError
from .units import env_seconds

__all__ = ["publish", "check", "fingerprint", "timeout_s", "ENV_TIMEOUT", "DEFAULT_TIMEOUT_S"]

ENV_TIMEOUT = "COMMPRESS_AGREE_TIMEOUT"
DEFAULT_TIMEOUT_S = 60.0
_PREFIX = "commpress/policy/"
_OFF = "off"

_lock = threading.Lock()
_mine = {"gen": 0, "value": _OFF, "last": ""}
_published_to: dict[str, Any] = {"store": None, "value": None}
_agreed: set[tuple[Any, ...]] = set()


def timeout_s(environ: Any = None) -> float:
    """Seconds a rank waits for the others' policies (``COMMPRESS_AGREE_TIMEOUT``; 0: off).

    Raises:
        ConfigError: the variable is not a number >= 0.
    """
    return env_seconds(ENV_TIMEOUT, DEFAULT_TIMEOUT_S, "0 turns the check off", environ)


def fingerprint(policy: Any) -> str:
    """A canonical text of ``policy``: equal on two ranks iff their policies are equal."""
    fields = {
        "codec": str(policy.codec),  # the canonical spec (a Codec's str is its spec)
        "min_bytes": policy.min_bytes,
        "ops": None if policy.ops is None else sorted(policy.ops),
        "error_feedback": policy.error_feedback,
        "algorithm": policy.algorithm,
        "verify": policy.verify,
        "gather_bytes": policy.gather_bytes,
        "checksum": policy.checksum,
    }
    extra = {
        k: repr(v) for k, v in vars(policy).items() if k not in fields and not k.startswith("_")
    }
    return json.dumps({**fields, **extra}, sort_keys=True, separators=(",", ":"))


def publish(policy: Any | None) -> None:
    """Record this process's policy (None: unpatched) and write it to the store if there is one."""
    with _lock:
        _mine["gen"] += 1
        if _mine["value"] != _OFF:
            _mine["last"] = _mine["value"]
        _mine["value"] = _OFF if policy is None else fingerprint(policy)
        _agreed.clear()
        _write_locked()


def published() -> str:
    """What this process publishes: ``"<generation>|<fingerprint or off>|<last fingerprint>"``."""
    return f"{_mine['gen']}|{_mine['value']}|{_mine['last']}"


def _store() -> Any:
    if not dist.is_available() or not dist.is_initialized():
        return None
    try:
        return c10d._get_default_store()
    except (RuntimeError, ValueError, AttributeError):
        return None


def _write_locked() -> Any:
    store = _store()
    if store is None:
        return None
    value = published()
    if _published_to["store"] is not store or _published_to["value"] != value:
        store.set(_PREFIX + str(dist.get_rank()), value)
        _published_to["store"], _published_to["value"] = store, value
    return store


def _parse(raw: bytes) -> tuple[int, str, str]:
    """``(generation, fingerprint or "off", the fingerprint before "off")``."""
    text = raw.decode("utf-8", "replace")
    gen, _, rest = text.partition("|")
    value, _, last = rest.partition("|")
    try:
        return int(gen), value, last
    except ValueError:
        return -1, text, ""


def check(group: Any = None, peer: int | None = None, *, op: str = "call") -> None:
    """Return once every rank of ``group`` (or just global rank ``peer``) runs this policy.

    Raises:
        CollectiveError: a rank published nothing, or ``off``, within `timeout_s`.
        CodecMismatchError: a rank runs another policy.
    """
    cache_key = (id(dist.group.WORLD), id(group), peer, _mine["gen"])
    if cache_key in _agreed:
        return
    limit = timeout_s()
    if limit == 0:
        _agreed.add(cache_key)
        return
    with _lock:
        store = _write_locked()
    if store is None:
        return
    me = dist.get_rank()
    if peer is not None:
        ranks = [peer]
    else:
        ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    others = [r for r in ranks if r != me]
    mine_gen, mine = _mine["gen"], _mine["value"]
    keys = {r: _PREFIX + str(r) for r in others}
    deadline = time.monotonic() + limit
    pause = 0.01
    seen: dict[int, tuple[int, str, str]] = {}
    while True:
        if keys and store.check(list(keys.values())):
            got = store.multi_get(list(keys.values()))
            seen = {r: _parse(v) for r, v in zip(keys, got, strict=True)}
        else:
            seen = {r: _parse(store.get(k)) for r, k in keys.items() if store.check([k])}
        if len(seen) == len(keys) and all(v[1] == mine for v in seen.values()):
            _agreed.add(cache_key)
            return
        # A rank at an older generation may still be on its way to this policy: wait for
        # it. One at this generation or past it will not change its mind: report now.
        clash = {r: v for r, v in seen.items() if v[0] >= mine_gen and v[1] != mine}
        if clash or time.monotonic() >= deadline:
            _raise(op, me, mine, others, seen, limit, waited=not clash)
        time.sleep(pause)
        pause = min(pause * 2, 0.25)


def _describe(value: str, last: str = "") -> str:
    if value == _OFF:
        if last:
            return f"is not patched (any more; it last ran {_describe(last)[5:]})"
        return "loaded commpress but is not patched"
    try:
        return f"runs policy {json.loads(value)}"
    except ValueError:
        return f"published {value!r}"


def _raise(
    op: str,
    me: int,
    mine: str,
    others: list[int],
    seen: dict[int, tuple[int, str, str]],
    limit: float,
    *,
    waited: bool,
) -> None:
    missing = [r for r in others if r not in seen]
    differ = {r: (v, last) for r, (_, v, last) in seen.items() if v != mine}
    lines = []
    if missing:
        lines.append(
            f"rank(s) {missing} published no commpress policy within {limit:g} s: they are not "
            "running commpress (started without `commpress run` or the start-up hook, e.g. by "
            "a launcher that clears the environment), or have not reached their first "
            "collective yet"
        )
    for r, (v, last) in sorted(differ.items()):
        lines.append(f"rank {r} {_describe(v, last)}")
    head = (
        f"commpress: rank {me} is patched ({_describe(mine)}) but not every rank of this "
        f"{op} agrees, so the call would hang or mix bytes:\n  - "
    )
    tail = (
        "\nRun every rank under the same commpress policy: `commpress run` (covers child "
        "processes), the same COMMPRESS_* environment on every rank, or the same "
        f"commpress.patch(...) call. {ENV_TIMEOUT} sets how long to wait"
        + (f" (waited {limit:g} s)." if waited else ".")
    )
    message = head + "\n  - ".join(lines) + tail
    # Ranks that run (or last ran) another policy: a codec mismatch; else nobody is there.
    if differ and not missing and all(v != _OFF or last for v, last in differ.values()):
        raise CodecMismatchError(message)
    raise CollectiveError(message)
