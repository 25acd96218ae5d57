"""The collective ops commpress knows, listed once.

Each public op of `commpress.distributed` (the name of the
``torch.distributed`` function it mirrors) belongs to a *family*: the name
`commpress.Policy.ops` uses, shared by aliases (``all_gather`` and
``all_gather_into_tensor`` are both ``"all_gather"``; the four point-to-point
calls are ``"p2p"``). Its wire code identifies it in the collective
descriptor, so two ranks that issued different ops learn it at once.

Everything else derives from `OPS`: `commpress.policy.OP_FAMILIES`, the
descriptor's op codes, ``commpress.distributed.__all__`` and the functions
`commpress.patch` swaps.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Op", "OPS", "TORCH_ALIASES", "FAMILIES", "REDUCTIONS", "family", "op_code"]


@dataclass(frozen=True)
class Op:
    """One public op: its name, its family and its code in the collective descriptor."""

    name: str
    family: str
    code: int


def _table(*rows: tuple[str, str]) -> dict[str, Op]:
    return {name: Op(name, fam, i + 1) for i, (name, fam) in enumerate(rows)}


#: Public op name -> `Op`, in the order of the descriptor codes (never reorder: the
#: codes go on the wire).
OPS: dict[str, Op] = _table(
    ("all_reduce", "all_reduce"),
    ("reduce", "reduce"),
    ("all_gather", "all_gather"),
    ("all_gather_into_tensor", "all_gather"),
    ("reduce_scatter", "reduce_scatter"),
    ("reduce_scatter_tensor", "reduce_scatter"),
    ("broadcast", "broadcast"),
    ("all_to_all", "all_to_all"),
    ("all_to_all_single", "all_to_all"),
    ("gather", "gather"),
    ("scatter", "scatter"),
    ("send", "p2p"),
    ("recv", "p2p"),
    ("isend", "p2p"),
    ("irecv", "p2p"),
)
#: Other names torch 2.13 gives some of these ops -> the op (the old names are deprecated).
TORCH_ALIASES: dict[str, str] = {
    "all_gather_single": "all_gather_into_tensor",
    "reduce_scatter_single": "reduce_scatter_tensor",
}
#: The families, in first-seen order.
FAMILIES: tuple[str, ...] = tuple(dict.fromkeys(o.family for o in OPS.values()))
#: Families whose op sums tensors (the others only move them).
REDUCTIONS: frozenset[str] = frozenset({"all_reduce", "reduce", "reduce_scatter"})


def family(op: str) -> str | None:
    """The family of public op ``op``, or None for a name commpress does not know."""
    o = OPS.get(op)
    return None if o is None else o.family


def op_code(op: str) -> int:
    """The descriptor code of public op ``op`` (0 for an internal one, e.g. a probe)."""
    o = OPS.get(op)
    return 0 if o is None else o.code
