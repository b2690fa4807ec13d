"""The filter language of `g2-study results --where` and `study.results.load(filters=...)`: conditions on columns.

A filter is parsed with `ast` (mode "eval", which never runs anything) and only the node types below are accepted;
it becomes a `pyarrow.compute` Expression applied to the loaded table. pandas' `DataFrame.query` is not used because
it evaluates Python (`@pd.io.common.os.system(...)` runs a command).

    filter     := filter "or" filter | filter "and" filter | "not" filter | "(" filter ")"
                | comparison | column                     (a boolean column alone: is_trial_setting)
    comparison := operand op operand [op operand ...]     (chained: 0.5 < g2.tau <= 2)
                | column ["not"] "in" list                (method in ['svd', 'quant'])
                | column ("==" | "!=" | "is" | "is not") None   (missing: error == None, val_metric is not None)
    op         := "==" | "!=" | "<" | "<=" | ">" | ">="
    operand    := column | literal
    column     := name | dotted.name | `any name`        (g2.tau and `g2.tau` are the same column)
    literal    := number | -number | 'string' | "string" | True | False
    list       := "[" literal, ... "]" | "(" literal, ... ")"

Strings compare with string columns, numbers with numeric ones, True/False with boolean ones, and an ISO time string
('2026-01-02T03:04') with a timestamp column (UTC if it names no zone). Missing values follow SQL: a comparison with a
missing value selects nothing, negated or not; `== None` finds them (NaN counts as missing, as in pandas' `isna`).
Anything else (calls, subscripts, arithmetic, `&` / `|` / `~`, `@` variables, lambdas, comprehensions) is a
`FilterError`.
"""
from __future__ import annotations

import ast
import difflib
import operator
from datetime import UTC, datetime
from functools import reduce
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

MAX_LENGTH = 10_000   # a filter is typed by a person; this bounds the parser's recursion
_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge}
_REFUSED = {ast.Call: "a function call", ast.Subscript: "a subscript", ast.Lambda: "a lambda",
            ast.ListComp: "a comprehension", ast.SetComp: "a comprehension", ast.DictComp: "a comprehension",
            ast.GeneratorExp: "a comprehension", ast.BinOp: "arithmetic", ast.IfExp: "a conditional expression",
            ast.NamedExpr: "an assignment", ast.JoinedStr: "an f-string", ast.Starred: "unpacking"}
_HINTS = {ast.BitAnd: "'&' is not supported (use `and`)", ast.BitOr: "'|' is not supported (use `or`)",
          ast.Invert: "'~' is not supported (use `not`)"}


class FilterError(ValueError):
    """A filter outside the language, naming an unknown column, or comparing a column with the wrong kind of value."""


def _kind(dtype: pa.DataType) -> str:
    """Which literals a column compares with; a list column (`sweep.ranks`) with none."""
    if pa.types.is_boolean(dtype):
        return "boolean"
    if pa.types.is_integer(dtype) or pa.types.is_floating(dtype):
        return "number"
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return "string"
    return "time" if pa.types.is_timestamp(dtype) else str(dtype)


def _unquote(text: str) -> tuple[str, dict[str, str]]:
    """`text` with each `quoted name` replaced by an identifier `ast` can parse, and those identifiers' names.

    '@' outside a string is refused here: it is pandas' local-variable syntax, the way code got in before.
    """
    prefix = "_q"
    while prefix in text:   # so that no placeholder is also something the user typed
        prefix += "_"
    out: list[str] = []
    names: dict[str, str] = {}
    quote, i = "", 0
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                out.append(text[i:i + 2])
                i += 2
                continue
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "@":
            raise FilterError(f"invalid filter {text!r}: '@' (a pandas variable) is not part of the filter language")
        elif ch == "`":
            end = text.find("`", i + 1)
            if end < 0:
                raise FilterError(f"invalid filter {text!r}: unterminated backquote at character {i + 1}")
            key = f"{prefix}{len(names)}"
            names[key] = text[i + 1:end]
            out.append(key)
            i = end + 1
            continue
        out.append(ch)
        i += 1
    return "".join(out), names


class _Compiler:
    """Walks one parsed filter; every method either returns an Expression or raises a FilterError."""

    def __init__(self, text: str, source: str, quoted: dict[str, str], schema: pa.Schema):
        self.text, self.source, self.quoted, self.schema = text, source, quoted, schema

    def shown(self, node: ast.AST) -> str:
        """The user's own text of `node` (backquotes restored)."""
        segment = ast.get_source_segment(self.source, node) or ast.unparse(node)
        for key, name in sorted(self.quoted.items(), key=lambda kv: -len(kv[0])):
            segment = segment.replace(key, f"`{name}`")
        return segment

    def refuse(self, node: ast.AST, problem: str) -> FilterError:
        return FilterError(f"invalid filter {self.text!r}: {problem}: {self.shown(node)}")

    def condition(self, node: ast.AST) -> pc.Expression:
        if isinstance(node, ast.BoolOp):
            combine = operator.and_ if isinstance(node.op, ast.And) else operator.or_
            return reduce(combine, [self.condition(v) for v in node.values])
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return ~self.condition(node.operand)
        if isinstance(node, ast.Compare):
            pairs = zip([node.left, *node.comparators], node.ops, node.comparators)
            return reduce(operator.and_, [self.pair(*p) for p in pairs])
        if self.column_name(node) is not None:
            name = self.column(node)
            if _kind(self.schema.field(name).type) != "boolean":
                raise self.refuse(node, f"column {name!r} is not boolean; compare it with a value")
            return pc.field(name)
        raise self.unsupported(node, "a condition")

    def unsupported(self, node: ast.AST, wanted: str) -> FilterError:
        op = getattr(node, "op", None)
        if type(op) in _HINTS:
            return self.refuse(node, _HINTS[type(op)])
        what = _REFUSED.get(type(node))
        return self.refuse(node, f"{what} is not allowed" if what else f"expected {wanted}")

    def pair(self, left: ast.AST, op: ast.cmpop, right: ast.AST) -> pc.Expression:
        """One link of a (possibly chained) comparison."""
        if isinstance(op, (ast.In, ast.NotIn)):
            name = self.column(left)
            if not isinstance(right, (ast.List, ast.Tuple)):
                raise self.refuse(right, "`in` needs a list of values like ['a', 'b']")
            values = [self.literal(v) for v in right.elts]
            present = [self.value_for(name, v, right) for v in values if v is not None]
            dtype = self.schema.field(name).type   # but [1, 2.5] on an int column is a float set, not a cast error
            found = pc.field(name).isin(pa.array(present, None if present and _kind(dtype) == "number" else dtype))
            if None in values:
                found = found | pc.field(name).is_null(nan_is_null=True)
            return ~found if isinstance(op, ast.NotIn) else found
        if isinstance(op, (ast.Is, ast.IsNot)) or _is_none(left) or _is_none(right):
            if not (_is_none(left) or _is_none(right)):
                raise self.refuse(right, "`is` compares only with None")
            if not isinstance(op, (ast.Eq, ast.NotEq, ast.Is, ast.IsNot)):
                raise self.refuse(left if _is_none(left) else right, "None compares only with ==, !=, is and is not")
            missing = pc.field(self.column(right if _is_none(left) else left)).is_null(nan_is_null=True)
            return missing if isinstance(op, (ast.Eq, ast.Is)) else ~missing
        lname, rname = self.column_name(left), self.column_name(right)
        values = [self.literal(n) for n, name in ((left, lname), (right, rname)) if name is None]
        if len(values) == 2:
            raise self.refuse(left, "a comparison needs a column on one side")
        if lname is not None and rname is not None:
            lkind, rkind = (_kind(self.schema.field(self.column(n)).type) for n in (left, right))
            if lkind != rkind:
                raise self.refuse(left, f"cannot compare a {lkind} column with a {rkind} column")
            return _COMPARE[type(op)](pc.field(lname), pc.field(rname))
        name = self.column(left if lname is not None else right)
        value_node = right if lname is not None else left
        value = pc.scalar(self.value_for(name, values[0], value_node))
        field = pc.field(name)
        return _COMPARE[type(op)](field, value) if lname is not None else _COMPARE[type(op)](value, field)

    def column_name(self, node: ast.AST) -> str | None:
        """`g2.tau` parses as an attribute of `g2`: the dotted chain is the column's name."""
        if isinstance(node, ast.Name):
            return self.quoted.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = self.column_name(node.value)
            return None if base is None else f"{base}.{node.attr}"
        return None

    def column(self, node: ast.AST) -> str:
        name = self.column_name(node)
        if name is None:
            raise self.unsupported(node, "a column")
        if name not in self.schema.names:
            close = difflib.get_close_matches(name, self.schema.names, n=1)
            maybe = f" (did you mean {close[0]!r}?)" if close else f" (a string value needs quotes: '{name}')"
            raise FilterError(f"invalid filter {self.text!r}: unknown column {name!r}{maybe}; "
                              f"columns are {', '.join(self.schema.names)}")
        return name

    def literal(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (bool, int, float, str))):
            return node.value
        if (isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd))
                and isinstance(node.operand, ast.Constant) and type(node.operand.value) in (int, float)):
            return -node.operand.value if isinstance(node.op, ast.USub) else node.operand.value
        if self.column_name(node) is not None:
            raise self.refuse(node, "expected a value, not a column")
        raise self.unsupported(node, "a value (a number, a quoted string, True or False)")

    def value_for(self, name: str, value: Any, node: ast.AST) -> Any:
        """`value` as column `name` holds it; a value of another kind is an error, not an Arrow kernel traceback."""
        dtype = self.schema.field(name).type
        kind = _kind(dtype)
        fits = {"number": type(value) in (int, float), "string": isinstance(value, str),   # True is an int: not here
                "boolean": isinstance(value, bool)}
        if fits.get(kind, False):
            return value
        if kind == "time" and isinstance(value, str):
            try:
                moment = datetime.fromisoformat(value)
            except ValueError:
                raise self.refuse(node, f"column {name!r} holds times; expected an ISO time like "
                                        "'2026-01-02T03:04'") from None
            return pa.scalar(moment if moment.tzinfo else moment.replace(tzinfo=UTC), dtype)
        raise self.refuse(node, f"column {name!r} holds {kind} values; cannot compare it with")


def _is_none(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is None


def compile_filter(text: str, schema: pa.Schema) -> pc.Expression:
    """The Expression selecting the rows `text` describes, its columns checked against `schema`.

    Raises:
        FilterError: `text` is outside the language (see the module docstring) or names an unknown column.
    """
    if len(text) > MAX_LENGTH:
        raise FilterError(f"filter is {len(text)} characters long; at most {MAX_LENGTH}")
    source, quoted = _unquote(text)
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        raise FilterError(f"invalid filter {text!r}: {getattr(err, 'msg', None) or err}") from None
    try:
        return _Compiler(text, source.strip(), quoted, schema).condition(tree.body)
    except RecursionError:
        raise FilterError(f"filter {text[:80]!r}… is nested too deeply") from None


def filter_table(table: pa.Table, text: str | None) -> pa.Table:
    """The rows of `table` that `text` selects (all of them for None or a blank filter); rows where it is null drop."""
    if text is None or not text.strip():
        return table
    expression = compile_filter(text, table.schema)
    try:
        return table.filter(expression)
    except pa.ArrowException as err:   # what the checks above did not foresee is still the filter's fault
        raise FilterError(f"cannot evaluate filter {text!r}: {err}") from None
