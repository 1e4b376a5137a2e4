"""Plain data across the candidate/harness boundary: a tagged JSON encoding and length-prefixed framing.

Threat model. The candidate process (model-written code) and the trusted test harness talk only through two
pipes carrying the messages defined here. Whatever bytes the candidate writes, the trusted side turns them
into *plain builtin values* (`decode`), so a test's `==`, `in`, `isclose`, `sorted`... run on objects whose
behaviour the candidate does not control: a returned object with a forged `__eq__`, an int subclass, a lazy
proxy or a string subclass cannot cross. The encoder (`encode`) runs on both sides; on the candidate side it
can be tampered with by the program, which does not matter, because only its *output* is trusted-decoded.

The encoding (stdlib json underneath, `allow_nan=False`):
  None, bool, str                 as JSON (lone surrogates survive: ensure_ascii escapes them)
  int (exactly int)               a JSON number when |x| < 2**62, else {"$": "int", "v": hex} (no 4300-digit limit)
  float (exactly float)           a JSON number when finite, else {"$": "float", "v": "nan" | "inf" | "-inf"}
  list                            a JSON array
  tuple, set, frozenset, deque    {"$": "tuple" | "set" | "frozenset" | "deque", "v": [...]}
  dict                            {"$": "dict", "v": [[key, value], ...]} (keys of any plain type, order kept)
  OrderedDict, Counter, defaultdict   the same with their tag; rebuilt as that class (defaultdict without factory)
  bytes, bytearray                {"$": "bytes" | "bytearray", "v": hex}
  complex, range                  {"$": "complex", "v": [re, im]}, {"$": "range", "v": [start, stop, step]}
  builtin iterators, generators   {"$": "iter", "v": [...]} materialised (within the caller's timer and the
                                  element budget), rebuilt as an iterator over a list
  dict views                      {"$": "keys" | "values" | "items", "v": [...]}
Anything else (an instance of a user class, a subclass of a builtin other than the ones above, a function)
is refused with `NotPlain`. Every JSON object in a message is a tag; an unknown tag, a malformed payload, an
unhashable key or nesting beyond MAX_DEPTH is a `ProtocolError` on the decoding side.

Framing: 4-byte big-endian length, then the JSON text; a reader refuses lengths above its limit.
"""
from __future__ import annotations

import collections
import itertools
import json
import math
import os
import select
import socket
import struct
import time

MAX_MSG = 8 << 20          # largest message either side accepts (bytes of JSON)
MAX_DEPTH = 100            # nesting depth of a value
MAX_ITEMS = 2_000_000      # elements (and string characters / 64) one value may hold
INLINE_INT = 1 << 62


class NotPlain(TypeError):
    """A value that is not plain data and so cannot cross the boundary."""


class ProtocolError(ValueError):
    """A message that does not follow the encoding or the framing."""


def _iterator_types() -> tuple[type, ...]:
    samples = [iter([]), iter(()), iter(""), iter(b""), iter(bytearray()), iter(range(0)), iter(range(1 << 70)),
               iter({}), iter({}.values()), iter({}.items()), iter(set()), reversed([]), reversed({}),
               map(abs, []), filter(None, []), zip(), enumerate([]), (x for x in ())]
    kinds = {type(s) for s in samples}
    kinds |= {v for v in vars(itertools).values() if isinstance(v, type)}
    return tuple(kinds)


_ITER_TYPES = _iterator_types()
_VIEWS = {type({}.keys()): "keys", type({}.values()): "values"}
_ITEMS_VIEW = type({}.items())
_SEQ_TAGS = {tuple: "tuple", set: "set", frozenset: "frozenset", collections.deque: "deque"}
_MAP_TAGS = {dict: "dict", collections.OrderedDict: "OrderedDict", collections.Counter: "Counter",
             collections.defaultdict: "defaultdict"}


class _Budget:
    __slots__ = ("left",)

    def __init__(self, n: int) -> None:
        self.left = n

    def take(self, n: int = 1) -> None:
        self.left -= n
        if self.left < 0:
            raise NotPlain(f"value too large to cross the boundary (more than {MAX_ITEMS} elements)")


def encode(x, budget: _Budget | None = None, depth: int = 0):
    """The JSON-able form of a plain value; raises NotPlain for anything else."""
    budget = budget or _Budget(MAX_ITEMS)
    budget.take()
    if depth > MAX_DEPTH:
        raise NotPlain(f"value nested deeper than {MAX_DEPTH} levels")
    t = type(x)
    if x is None or t is bool:
        return x
    if t is str:
        budget.take(len(x) >> 6)
        return x
    if t is int:
        return x if -INLINE_INT < x < INLINE_INT else {"$": "int", "v": hex(x)}
    if t is float:
        return x if math.isfinite(x) else {"$": "float", "v": repr(x)}
    if t is list:
        return [encode(v, budget, depth + 1) for v in x]
    if t in _SEQ_TAGS:
        return {"$": _SEQ_TAGS[t], "v": [encode(v, budget, depth + 1) for v in x]}
    if t in _MAP_TAGS:
        return {"$": _MAP_TAGS[t], "v": [[encode(k, budget, depth + 1), encode(v, budget, depth + 1)]
                                          for k, v in x.items()]}
    if t is bytes or t is bytearray:
        budget.take(len(x) >> 6)
        return {"$": t.__name__, "v": x.hex()}
    if t is complex:
        return {"$": "complex", "v": [encode(x.real, budget), encode(x.imag, budget)]}
    if t is range:
        return {"$": "range", "v": [x.start, x.stop, x.step]}
    if t is _ITEMS_VIEW:
        return {"$": "items", "v": [[encode(k, budget, depth + 1), encode(v, budget, depth + 1)] for k, v in x]}
    if t in _VIEWS:
        return {"$": _VIEWS[t], "v": [encode(v, budget, depth + 1) for v in x]}
    if t in _ITER_TYPES:
        out = []
        for v in x:  # an endless iterator ends here: the budget runs out (or the caller's timer fires)
            out.append(encode(v, budget, depth + 1))
        return {"$": "iter", "v": out}
    raise NotPlain(f"a {t.__module__}.{t.__qualname__} is not plain data (only builtin values cross)")


def dumps(x) -> bytes:
    return json.dumps(x, allow_nan=False, separators=(",", ":")).encode()


def _hashable(v, what: str):
    try:
        hash(v)
    except TypeError:
        raise ProtocolError(f"unhashable {type(v).__name__} as a {what}") from None
    return v


def _items(v, depth: int) -> list:
    if type(v) is not list:
        raise ProtocolError("tagged payload is not a list")
    return [decode(e, depth + 1) for e in v]


def _pairs(v, depth: int) -> list:
    if type(v) is not list or any(type(p) is not list or len(p) != 2 for p in v):
        raise ProtocolError("mapping payload is not a list of pairs")
    return [(_hashable(decode(k, depth + 1), "key"), decode(w, depth + 1)) for k, w in v]


def _dec_scalar_tag(tag: str, v):
    if tag == "int" and type(v) is str and v.lower().lstrip("-").startswith("0x"):
        return int(v, 16)
    if tag == "float" and v in ("nan", "inf", "-inf"):
        return float(v)
    if tag in ("bytes", "bytearray") and type(v) is str:
        try:
            return (bytes if tag == "bytes" else bytearray).fromhex(v)
        except ValueError:
            raise ProtocolError("bad hex in a bytes payload") from None
    if tag == "complex" and type(v) is list and len(v) == 2:
        re, im = (decode(p, MAX_DEPTH) for p in v)
        if type(re) in (int, float) and type(im) in (int, float):
            return complex(re, im)
    if tag == "range" and type(v) is list and len(v) == 3 and all(type(p) is int for p in v) and v[2] != 0:
        return range(*v)
    raise ProtocolError(f"malformed {tag!r} payload")


_SEQ_BUILD = {"tuple": tuple, "deque": collections.deque, "iter": lambda xs: iter(xs),
              "values": lambda xs: dict(enumerate(xs)).values()}
_HASHED_BUILD = {"set": set, "frozenset": frozenset, "keys": lambda xs: dict.fromkeys(xs).keys()}
_MAP_BUILD = {"dict": dict, "OrderedDict": collections.OrderedDict,
              "Counter": lambda pairs: collections.Counter(dict(pairs)),
              "defaultdict": lambda pairs: collections.defaultdict(None, pairs)}


def decode(obj, depth: int = 0):
    """Plain builtin values from a parsed message; raises ProtocolError for anything malformed."""
    if depth > MAX_DEPTH + 2:
        raise ProtocolError(f"value nested deeper than {MAX_DEPTH} levels")
    t = type(obj)
    if obj is None or t in (bool, int, float, str):
        return obj
    if t is list:
        return [decode(v, depth + 1) for v in obj]
    if t is not dict or set(obj) != {"$", "v"} or type(obj["$"]) is not str:
        raise ProtocolError(f"not an encoded value: {type(obj).__name__}")
    tag, v = obj["$"], obj["v"]
    if tag in _SEQ_BUILD:
        return _SEQ_BUILD[tag](_items(v, depth))
    if tag in _HASHED_BUILD:
        return _HASHED_BUILD[tag]([_hashable(e, "set element") for e in _items(v, depth)])
    if tag in _MAP_BUILD:
        return _MAP_BUILD[tag](_pairs(v, depth))
    if tag == "items":
        return dict(_pairs(v, depth)).items()
    return _dec_scalar_tag(tag, v)


def loads(data: bytes):
    """Parse and decode one message body (trusted side)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # ValueError: bad JSON or an int beyond 4300 digits
        raise ProtocolError(f"undecodable message: {type(e).__name__}: {str(e)[:100]}") from None


# ---- framing ---------------------------------------------------------------------------------------------


def frame(body: bytes) -> bytes:
    return struct.pack("!I", len(body)) + body


def write_all(fd: int, data: bytes, deadline: float | None = None) -> None:
    """Write everything; with a deadline, fd must be non-blocking and TimeoutError is raised past it."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
            continue
        except BlockingIOError:
            pass
        left = deadline - time.monotonic() if deadline is not None else None
        if left is not None and (left <= 0 or not select.select([], [fd], [], left)[1]):
            raise TimeoutError("peer did not read in time")


class FrameReader:
    """Reads length-prefixed messages from fd (blocking, or non-blocking with deadlines), buffering reads.
    EOFError: the peer is gone; TimeoutError: past the deadline; ProtocolError: a message over the limit."""

    def __init__(self, fd: int, limit: int = MAX_MSG) -> None:
        self.fd, self.limit, self.buf = fd, limit, bytearray()

    def _fill(self, deadline: float | None) -> None:
        try:
            chunk = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            left = deadline - time.monotonic() if deadline is not None else None
            if left is not None and (left <= 0 or not select.select([self.fd], [], [], left)[0]):
                raise TimeoutError("peer did not answer in time") from None
            return
        if not chunk:
            raise EOFError("peer closed the channel")
        self.buf += chunk

    def read(self, deadline: float | None = None) -> bytes:
        while len(self.buf) < 4:
            self._fill(deadline)
        (n,) = struct.unpack_from("!I", self.buf)
        if n > self.limit:
            raise ProtocolError(f"message of {n} bytes exceeds the {self.limit}-byte limit")
        while len(self.buf) < 4 + n:
            self._fill(deadline)
        body = bytes(self.buf[4:4 + n])
        del self.buf[:4 + n]
        return body


def send_with_fds(sock, obj: dict, fds: list[int]) -> None:
    """One JSON message with descriptors attached (SCM_RIGHTS) on a stream socket."""
    body = json.dumps(obj).encode()
    socket.send_fds(sock, [struct.pack("!I", len(body))], fds)
    sock.sendall(body)


def recv_with_fds(sock) -> tuple[dict, list[int]]:
    """The counterpart of send_with_fds. EOFError when the peer closed the socket."""
    head, fds, _, _ = socket.recv_fds(sock, 4, 8)
    while len(head) < 4:
        more = sock.recv(4 - len(head))
        if not more:
            raise EOFError("peer closed the socket")
        head += more
    (n,) = struct.unpack("!I", head)
    body = bytearray()
    while len(body) < n:
        chunk = sock.recv(min(n - len(body), 1 << 20))
        if not chunk:
            raise EOFError("peer closed the socket mid-message")
        body += chunk
    return json.loads(body), fds


# ---- exceptions ------------------------------------------------------------------------------------------

# candidate exceptions that come back as the same builtin type; the rest become CandidateError
_NEVER_MAPPED = ("StopIteration", "StopAsyncIteration")


class CandidateError(Exception):
    """The candidate raised an exception that is not a builtin Exception type (or a SystemExit...)."""


def exception_from(name: object, msg: object) -> BaseException:
    """The trusted-side exception for a candidate's exception report (type name + message)."""
    import builtins

    text = str(msg)[:500]
    cls = getattr(builtins, name, None) if isinstance(name, str) else None
    if (isinstance(cls, type) and issubclass(cls, Exception) and name not in _NEVER_MAPPED
            and not issubclass(cls, Warning)):
        try:
            return cls(text)
        except Exception:  # a builtin exception with a different constructor (UnicodeDecodeError...)
            pass
    return CandidateError(f"{str(name)[:100]}: {text}")


def describe_exception(e: BaseException) -> tuple[str, str]:
    """(type name, message) of an exception raised by candidate code (runs on the candidate side)."""
    try:
        msg = str(e)[:500]
    except BaseException:
        msg = "<unprintable>"
    return type(e).__name__, msg


__all__ = ["MAX_MSG", "CandidateError", "FrameReader", "NotPlain", "ProtocolError", "decode", "describe_exception",
           "dumps", "encode", "exception_from", "frame", "loads", "recv_with_fds", "send_with_fds", "write_all"]
