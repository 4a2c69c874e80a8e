"""Chat templates rendered in a sandbox with budgets.

A chat template is code from the model directory (or a client): it runs in jinja2's
immutable sandbox with limits on time, operations and sizes, so a runaway or malicious
template fails its request with ValueError and never the server.
"""

from __future__ import annotations

import functools
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import jinja2
import jinja2.meta
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

_RENDER_SECONDS = 2.0
_RENDER_OPS = 1_000_000  # loop items + attribute/item lookups + calls + filters
_RENDER_MAX_LEN = 16_000_000  # longest str/list (and largest int argument) allowed
_HUGE_FORMAT_WIDTH = re.compile(r"\d{8,}")  # "%100000000d", "{:>100000000}"


class _TemplateBudgetError(Exception):
    pass


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask marker)."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class ChatTemplateRenderer(ImmutableSandboxedEnvironment):
    """transformers' chat-template environment (sandboxed, trim_blocks, lstrip_blocks,
    loopcontrols, ``raise_exception``, ``strftime_now``, its ``tojson``) plus budgets on
    time, operations and sizes. Unsafe attribute access raises instead of rendering ''."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def __init__(self) -> None:
        super().__init__(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationTag]
        )
        self._state = threading.local()  # budgets of the render running on this thread
        self._compiled: dict[str, jinja2.Template] = {}
        self.filters["tojson"] = _tojson
        self.filters = {name: self._guarded(name, f) for name, f in self.filters.items()}
        self.filters["_budget_iter"] = self._budget_iter
        self.globals.update(
            raise_exception=_raise_exception, strftime_now=_strftime_now, range=self._range
        )

    def variables(self, source: str) -> frozenset[str]:
        """The names ``source`` reads from its context (jinja2.meta's undeclared variables:
        not the ones it sets itself); empty when it does not parse."""
        try:
            return frozenset(jinja2.meta.find_undeclared_variables(self.parse(source)))
        except jinja2.TemplateError:
            return frozenset()

    def render(self, source: str, **variables: Any) -> str:
        """Render ``source``; every failure (syntax, raise_exception, sandbox, budget) is a
        ``ValueError`` carrying the template's message."""
        try:
            template = self._compiled.get(source)
            if template is None:
                if len(self._compiled) >= 16:  # client-given templates must not pile up
                    self._compiled.clear()
                template = self._compiled[source] = self.from_string(source)
            self._state.deadline = time.monotonic() + _RENDER_SECONDS
            self._state.ops = 0
            chunks: list[str] = []
            size = 0
            for chunk in template.generate(**_plain(variables)):
                size += len(chunk)
                if size > _RENDER_MAX_LEN:
                    raise _TemplateBudgetError(f"output longer than {_RENDER_MAX_LEN} chars")
                chunks.append(chunk)
            return "".join(chunks)
        except Exception as exc:  # a template must never take the server down
            raise ValueError(f"chat template failed: {type(exc).__name__}: {exc}") from exc

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        # Every {% for %} iterable goes through the _budget_iter filter: one tick per item,
        # so loops over data are bounded too (a filter, unlike a global, can't be shadowed).
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Filter(loop.iter, "_budget_iter", [], [], None, None)
        return tree

    def _tick(self, ops: int = 1) -> None:
        self._state.ops += ops
        if self._state.ops > _RENDER_OPS:
            raise _TemplateBudgetError(f"more than {_RENDER_OPS} operations")
        if time.monotonic() > self._state.deadline:
            raise _TemplateBudgetError(f"took longer than {_RENDER_SECONDS}s")

    def _sized(self, *values: Any, ints: bool = False) -> Any:
        """Refuse oversized values; with ``ints``, also huge numbers (arguments that size
        a result, like ``center(10**10)``, refused before anything is built)."""
        for v in values:
            if isinstance(v, (str, list, tuple, dict)) and len(v) > _RENDER_MAX_LEN:
                raise _TemplateBudgetError(f"a value longer than {_RENDER_MAX_LEN} items")
            if ints and type(v) is int and abs(v) > _RENDER_MAX_LEN:
                raise _TemplateBudgetError(f"a number larger than {_RENDER_MAX_LEN}")
        return values[-1] if values else None

    def _guarded(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)  # keeps jinja's pass_context/pass_environment marks
        def guarded(*args: Any, **kwargs: Any) -> Any:
            self._tick()
            self._sized(*args[:1])  # the filtered value (or context) may be any number
            self._sized(*args[1:], *kwargs.values(), ints=True)
            if name == "format" and args and _HUGE_FORMAT_WIDTH.search(str(args[0])):
                raise _TemplateBudgetError("format width too large")
            if name == "replace" and len(args) >= 4 and isinstance(args[1], str):
                # replace("", x) inserts x between every character: size it first.
                value, old, new = str(args[1]), str(args[2]), str(args[3])
                hits = value.count(old) if old else len(value) + 1
                self._sized(len(value) + hits * max(0, len(new) - len(old)), ints=True)
            return self._sized(func(*args, **kwargs))

        return guarded

    def _budget_iter(self, iterable: Any) -> Iterator[Any]:
        for item in iterable:
            self._tick()
            yield item

    def _range(self, *args: int) -> range:
        rng = range(*args)
        self._tick(len(rng))  # charged up front: a range may feed a filter, not only a loop
        return rng

    def getattr(self, obj: Any, attribute: str) -> Any:
        self._tick()
        return self._sized(super().getattr(obj, attribute))

    def getitem(self, obj: Any, argument: Any) -> Any:
        self._tick()
        return self._sized(super().getitem(obj, argument))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        __self._tick()
        __self._sized(*args, *kwargs.values(), ints=True)
        return __self._sized(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        self._sized(left, right)
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 1024:
            raise _TemplateBudgetError("exponent larger than 1024")
        if operator == "*":
            seq, count = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(count, int):
                self._sized(len(seq) * count, ints=True)
        if operator == "%" and isinstance(left, str) and _HUGE_FORMAT_WIDTH.search(left):
            raise _TemplateBudgetError("format width too large")
        return self._sized(super().call_binop(context, operator, left, right))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        owner = getattr(value, "__self__", None)
        if isinstance(owner, str) and _HUGE_FORMAT_WIDTH.search(owner):
            raise _TemplateBudgetError("format width too large")
        return super().wrap_str_format(value)

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} is not allowed"
        )


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers' version: no HTML escaping (Jinja's own tojson escapes <, >, &, ').
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _plain(value: Any) -> Any:
    """A copy made of plain JSON types only: objects with methods never reach the template."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"
