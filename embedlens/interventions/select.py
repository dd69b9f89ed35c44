"""Token selections: which positions of a batch an intervention acts on.

A selection is either a list of visual-token indices (the n-th visual token of
each sample, in sequence order) or an expression over the token-role map:

- role names: ``visual``, ``image_newline``, ``image_cls``, ``image_span``, ``text``,
  ``template``, ``question``, ``answer``, ``bos``, ``special``, ``last``,
  ``all``, ``none``;
- group names from the run's partition (``sink``, ``dead``, ``alive``, or any
  group the partition defines);
- comparisons on token metadata: ``row``, ``col``, ``image``, ``tile``,
  ``frame`` (a video token's temporal index, -1 off video), ``position``
  (index in the sequence) and ``index`` (n-th visual token of the sample),
  e.g. ``row < 12``, ``index in [0, 5, 7]``, ``col % 2 == 0``,
  ``visual and frame == 2``;
- combined with ``and``, ``or``, ``not`` (or ``&``, ``|``, ``~``, which here
  bind looser than comparisons, so ``visual & row < 2`` means what it says)
  and parentheses.

Example:
    >>> sel = Selection.parse("visual & row < 2")
    >>> sel.names
    {'visual'}
    >>> Selection.parse("visual & rows < 2")
    Traceback (most recent call last):
    ...
    embedlens.errors.InterventionError: unknown name 'rows' in selection 'visual & rows < 2': comparisons take token fields. Did you mean: row?
"""

from __future__ import annotations

import ast
import difflib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Union

from embedlens._arrays import device_of, namespace, on_device
from embedlens.errors import InterventionError

if TYPE_CHECKING:
    from embedlens.roles import TokenRoles

ROLE_NAMES = (
    "visual",
    "image_newline",
    "image_cls",
    "image_span",
    "text",
    "template",
    "question",
    "answer",
    "bos",
    "special",
    "last",
    "padding",
)
FIELDS = ("row", "col", "image", "tile", "frame", "position", "index")
CONSTANTS = ("all", "none")

# What plugins accept as a selection parameter.
SelectionSpec = Union[str, list[int]]

_CMP = {  # the function of each comparison, by its torch name (see `embedlens._arrays`)
    ast.Lt: "lt",
    ast.LtE: "le",
    ast.Gt: "gt",
    ast.GtE: "ge",
    ast.Eq: "eq",
    ast.NotEq: "ne",
}


def visual_index(roles: "TokenRoles") -> torch.Tensor:
    """`[batch, seq]` long: the n-th visual token of its sample (-1 elsewhere)."""
    vis = roles.visual
    xp = namespace(vis)
    return xp.where(vis, xp.cumsum(xp.as_tensor(vis, dtype=xp.long), dim=1) - 1, -1)


#: Selections are short expressions; longer or deeper ones are refused before they are evaluated.
MAX_SOURCE = 2000
MAX_DEPTH = 32
#: The largest number a selection may hold: token fields are int64 tensors; 10**25 cannot become one.
MAX_NUMBER = 2**31 - 1


def _depth(node: ast.AST) -> int:
    """Nesting depth of an expression tree, without recursion (a deep tree must not raise RecursionError)."""
    best, todo = 0, [(node, 1)]
    while todo:
        n, d = todo.pop()
        best = max(best, d)
        todo += [(c, d + 1) for c in ast.iter_child_nodes(n)]
    return best


@dataclass(frozen=True)
class Selection:
    """A parsed selection; `evaluate` turns it into a `[batch, seq]` bool mask."""

    source: str
    tree: ast.AST | None  # None: an index list
    indices: tuple[int, ...] = ()

    @classmethod
    def parse(cls, spec: "SelectionSpec | Selection") -> "Selection":
        """Parse a selection; a misspelt field raises with suggestions.

        Args:
            spec: an expression string or a list of visual-token indices. Names
                that are not roles or fields are taken as partition groups and
                checked when evaluated, when the run's partition is known.
        """
        if isinstance(spec, Selection):
            return spec
        if isinstance(spec, (list, tuple)):
            bad = [i for i in spec if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i <= MAX_NUMBER]
            if bad:
                raise InterventionError(f"a selection list holds visual-token indices (ints in 0..{MAX_NUMBER}); got {bad[:5]}")
            return cls(source=str(list(spec)), tree=None, indices=tuple(spec))
        if not isinstance(spec, str) or not spec.strip():
            raise InterventionError(f"a selection is an expression string or a list of indices; got {spec!r}")
        if len(spec) > MAX_SOURCE:
            raise InterventionError(f"a selection is at most {MAX_SOURCE} characters; got {len(spec)}")
        text = spec.replace("&", " and ").replace("|", " or ").replace("~", " not ").strip()  # stripped last: "~text" starts with a space
        try:
            tree = ast.parse(text, mode="eval").body
        except SyntaxError as exc:
            raise InterventionError(f"selection {spec!r} is not a valid expression: {exc.msg}") from None
        except (RecursionError, MemoryError):
            raise InterventionError(f"selection {spec[:60]!r}...: nested too deeply") from None
        depth = _depth(tree)
        if depth > MAX_DEPTH:
            raise InterventionError(f"selection {spec[:60]!r}: nested {depth} levels deep; at most {MAX_DEPTH}")
        sel = cls(source=spec, tree=tree)
        sel._check(tree)
        return sel

    def state_dict(self) -> dict[str, object]:
        """A selection is immutable and rebuilt from the plan; its state only identifies it (see `embedlens.state`)."""
        return {"source": self.source, "indices": list(self.indices)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        from embedlens.state import CheckpointError

        if state != self.state_dict():
            raise CheckpointError(f"selection {self.source!r}: the checkpoint was written for selection {state.get('source')!r}")

    @property
    def names(self) -> set[str]:
        if self.tree is None:
            return set()
        return {n.id for n in ast.walk(self.tree) if isinstance(n, ast.Name)} - set(FIELDS)

    def group_names(self) -> set[str]:
        """Names that must come from a partition."""
        return self.names - set(ROLE_NAMES) - set(CONSTANTS)

    def _check(self, node: ast.AST) -> None:
        allowed = (
            ast.BinOp,
            ast.BoolOp,
            ast.And,
            ast.Or,
            ast.Not,
            ast.UnaryOp,
            ast.Compare,
            ast.Name,
            ast.Constant,
            ast.List,
            ast.Tuple,
            ast.Mod,
            ast.Load,
            ast.In,
            ast.NotIn,
            ast.USub,
            *_CMP,
        )
        for n in ast.walk(node):
            if not isinstance(n, allowed):
                raise InterventionError(
                    f"selection {self.source!r}: {type(n).__name__} is not allowed; use role/group names, "
                    f"comparisons on {', '.join(FIELDS)}, and/or/not"
                )
            if isinstance(n, ast.Constant) and isinstance(n.value, (int, float, complex)) and not isinstance(n.value, bool) and not (
                not isinstance(n.value, complex) and math.isfinite(n.value) and abs(n.value) <= MAX_NUMBER
            ):
                shown = f"{n.value:.3g}" if not isinstance(n.value, complex) else repr(n.value)
                raise InterventionError(f"selection {self.source!r}: the number {shown} is out of range; expected a number "
                                        f"within +-{MAX_NUMBER} (token fields are whole numbers)")
            if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Mod) and not (
                isinstance(n.right, ast.Constant) and isinstance(n.right.value, int) and not isinstance(n.right.value, bool) and n.right.value > 0
            ):
                raise InterventionError(f"selection {self.source!r}: '% N' needs a whole number N > 0 (e.g. index % 2 == 0)")
            if isinstance(n, ast.Compare):
                for operand in [n.left, *n.comparators]:
                    if isinstance(operand, ast.Name) and operand.id not in FIELDS:
                        close = difflib.get_close_matches(operand.id, FIELDS, n=2)
                        hint = f" Did you mean: {', '.join(close)}?" if close else f" Fields: {', '.join(FIELDS)}"
                        raise InterventionError(
                            f"unknown name {operand.id!r} in selection {self.source!r}: comparisons take token fields.{hint}"
                        )

    # -- evaluation ------------------------------------------------------------
    def evaluate(self, roles: "TokenRoles", groups: "Callable[[str], torch.Tensor] | None" = None) -> torch.Tensor:
        """The `[batch, seq]` bool mask this selection picks in a batch.

        Computed with the array library of `roles` (`embedlens._arrays`): on the device for torch tensors, as
        a run evaluates it; on NumPy arrays where `validate` counts a control's pool without torch.

        Args:
            roles: the batch's token-role map.
            groups: returns a group's `[batch, seq]` mask by name; needed when
                the selection names a group.
        """
        xp = namespace(roles.kind)
        if self.tree is None:
            idx = visual_index(roles)
            return xp.isin(idx, on_device(xp, self.indices, device_of(idx))) & roles.visual
        out = self._eval(self.tree, roles, groups)
        if not (xp.is_tensor(out) and out.dtype == xp.bool):
            raise InterventionError(f"selection {self.source!r} does not give a token mask (is it a comparison?)")
        return out & ~roles.padding

    def _eval(self, node, roles, groups):
        xp = namespace(roles.kind)
        if isinstance(node, ast.Name):
            name = node.id
            if name == "all":
                return xp.ones_like(roles.kind, dtype=xp.bool)
            if name == "none":
                return xp.zeros_like(roles.kind, dtype=xp.bool)
            if name in ROLE_NAMES:
                return xp.clone(getattr(roles, name))
            if name in FIELDS:
                if name == "position":
                    return xp.broadcast_to(xp.arange(roles.kind.shape[1], device=device_of(roles.kind)), roles.kind.shape)
                if name == "index":
                    return visual_index(roles)
                return getattr(roles, name)
            if groups is None:
                close = difflib.get_close_matches(name, ROLE_NAMES + CONSTANTS, n=2)
                hint = f" (did you mean: {', '.join(close)}?)" if close else ""
                raise InterventionError(
                    f"selection {self.source!r} names group {name!r}{hint} but this run defines no partition; "
                    "define one (anchor ids) or select by role"
                )
            return groups(name)
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, int):
                raise InterventionError(f"selection {self.source!r}: only integer constants are allowed; got {node.value!r}")
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            return [self._eval(e, roles, groups) for e in node.elts]
        if isinstance(node, ast.UnaryOp):
            v = self._eval(node.operand, roles, groups)
            if isinstance(node.op, ast.Not):
                return ~self._mask(v, node.operand, xp)
            return -v
        if isinstance(node, ast.BoolOp):
            masks = [self._mask(self._eval(v, roles, groups), v, xp) for v in node.values]
            out = masks[0]
            for m in masks[1:]:
                out = out & m if isinstance(node.op, ast.And) else out | m
            return out
        if isinstance(node, ast.BinOp):
            a, b = self._eval(node.left, roles, groups), self._eval(node.right, roles, groups)
            return a % b
        if isinstance(node, ast.Compare):
            left = self._eval(node.left, roles, groups)
            out = None
            for op, comp in zip(node.ops, node.comparators):
                right = self._eval(comp, roles, groups)
                if isinstance(op, (ast.In, ast.NotIn)):
                    if not isinstance(right, list):
                        raise InterventionError(f"selection {self.source!r}: `in` needs a list, e.g. index in [0, 1]")
                    r = xp.isin(left, on_device(xp, right, device_of(roles.kind)))
                    r = ~r if isinstance(op, ast.NotIn) else r
                else:
                    r = getattr(xp, _CMP[type(op)])(xp.as_tensor(left), xp.as_tensor(right))
                out = r if out is None else out & r
                left = right
            return out
        raise InterventionError(f"selection {self.source!r}: cannot evaluate {ast.dump(node)}")

    def _mask(self, value, node, xp) -> torch.Tensor:
        if xp.is_tensor(value) and value.dtype == xp.bool:
            return value
        raise InterventionError(
            f"selection {self.source!r}: {ast.unparse(node)!r} is not a token mask; "
            "combine names and comparisons with and/or/not (e.g. visual and row < 4)"
        )

    def __str__(self) -> str:
        return self.source
