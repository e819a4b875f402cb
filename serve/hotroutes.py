"""The hot routes, written once: method, path, what each query parameter may be, and who
answers. Everything else that knows their shape is derived from this table:

* `serve.fastpath.match`, which answers them without FastAPI's routing;
* the replicas' side server (`serve/side.py`), which serves the `side` routes;
* the node's HAProxy rules (`cluster/haproxy.py` renders `haproxy_side_rules` and
  `haproxy_edge_acl`): what HAProxy sends to the side server or answers from its cache;
* the FastAPI routes' own limits (`serve/routes/`), which use the constants below.

The rule that keeps the answers equal on every path: HAProxy sends to the side server
only what the fast path matches, and the fast path matches only what FastAPI accepts,
so a request outside a route's shape is FastAPI's to answer (its 422, worded once).
Stdlib only: the HAProxy wrapper imports this before HAProxy starts.
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl

EVENT_ID_MAX = 64       # ids the ledger makes are 16 hex characters; 64 leaves room
EVENT_ID_CHARS = "A-Za-z0-9_-"
USER_ID_MAX = 128       # a token's `sub` is at most 128 characters (eventpulse.auth)
FIELDS_MAX = 500        # `?fields=` of the tickets route: every field name, comma-separated
TOKEN_MAX = 4096        # `?access_token=` of a stream (EventSource cannot send headers)
WAIT_MAX_S = 30         # `?wait=` of a purchase
# `?wait=` in its plain spellings; past the route's 30 s, or spelt otherwise, the
# fast path leaves it to FastAPI (which answers 422 past 30)
WAIT_PATTERN = r"([0-9]|[12][0-9]|30)(\.[0-9]{1,3})?"

# path parameters: the characters and length HAProxy routes on (the fast path takes any
# segment and lets the route's own code answer 404 for an id that cannot exist)
_PATH_PARAM = {"event_id": f"[{EVENT_ID_CHARS}]{{1,{EVENT_ID_MAX}}}",
               "user_id": f"[^/]{{1,{USER_ID_MAX}}}"}


_compiled = functools.lru_cache(maxsize=None)(re.compile)


@dataclass(frozen=True, slots=True)
class Param:
    """A query parameter a hot route takes: present (or not), at most `max_len`
    characters once decoded, and matching `pattern` when one is given."""

    name: str
    max_len: int
    required: bool = True
    pattern: str | None = None

    def accepts(self, value: str) -> bool:
        if len(value) > self.max_len:
            return False
        return self.pattern is None or _compiled(self.pattern).fullmatch(value) is not None

    def haproxy(self) -> str:
        """The parameter as it appears in a raw query string (a raw value is at least as
        long as its decoded one, so HAProxy's bound is never looser)."""
        value = self.pattern or f"[^&]{{{1 if self.required else 0},{self.max_len}}}"
        return f"{re.escape(self.name)}={value}"


@dataclass(frozen=True, slots=True)
class HotRoute:
    method: str
    path: str                       # FastAPI's template: also the metrics' route label
    query: tuple[Param, ...] = ()
    json_body: bool = False         # the fast path takes only a JSON body
    side: bool = True               # the replicas' side server answers it
    edge: bool = False              # HAProxy answers it from a 1 s cache for callers
                                    # whose token it verified; its misses go to the side server

    @property
    def segments(self) -> list[str]:
        return self.path.split("/")

    def path_regex(self) -> str:
        return "^" + "/".join(_PATH_PARAM[s[1:-1]] if s.startswith("{") else re.escape(s)
                              for s in self.segments) + "$"

    def takes_no_query(self) -> bool:
        return not any(p.required for p in self.query)

    def query_regex(self) -> str | None:
        """Every spelling of a non-empty query HAProxy sends on (each allowed set of
        parameters once, in any order), or None when the route takes no parameter."""
        if not self.query:
            return None
        required = [p for p in self.query if p.required]
        optional = [p for p in self.query if not p.required]
        shapes = []
        for n in range(len(optional) + 1):
            for extra in itertools.combinations(optional, n):
                chosen = required + list(extra)
                if chosen:
                    shapes += ["&".join(p.haproxy() for p in order)
                               for order in itertools.permutations(chosen)]
        return "^(" + "|".join(shapes) + ")$"


HEALTH = HotRoute("GET", "/healthz", side=False)  # HAProxy answers it, and checks the side server with it
EVENT = HotRoute("GET", "/api/events/{event_id}", edge=True)
AVAILABILITY = HotRoute("GET", "/api/events/{event_id}/availability", edge=True)
QUEUE_ME = HotRoute("GET", "/api/events/{event_id}/queue/me")
STREAM = HotRoute("GET", "/api/events/{event_id}/queue/me/stream",
                  (Param("access_token", TOKEN_MAX, required=False),))
POSITION = HotRoute("GET", "/api/queue/position",
                    (Param("eventId", EVENT_ID_MAX), Param("userId", USER_ID_MAX)))
TICKETS = HotRoute("GET", "/api/users/{user_id}/tickets",
                   (Param("eventId", EVENT_ID_MAX, required=False),
                    Param("fields", FIELDS_MAX, required=False)))
JOIN = HotRoute("POST", "/api/events/{event_id}/queue", json_body=True)
PURCHASE = HotRoute("POST", "/api/events/{event_id}/purchases",
                    (Param("wait", 6, required=False, pattern=WAIT_PATTERN),), json_body=True)

ROUTES = (HEALTH, EVENT, AVAILABILITY, QUEUE_ME, STREAM, POSITION, TICKETS, JOIN, PURCHASE)
BY_NAME = {r.path: r for r in ROUTES}
SIDE = frozenset(r.path for r in ROUTES if r.side) | {HEALTH.path}



class _Shape:
    """A route's shape, precomputed for `match` (it runs on every request)."""

    __slots__ = ("route", "literals", "params", "bare", "allowed", "required")

    def __init__(self, route: HotRoute) -> None:
        segs = route.segments
        self.route = route
        self.literals = tuple((i, s) for i, s in enumerate(segs) if not s.startswith("{"))
        self.params = tuple(i for i, s in enumerate(segs) if s.startswith("{"))
        self.bare = route.takes_no_query()
        self.allowed = {p.name: p for p in route.query}
        self.required = tuple(p.name for p in route.query if p.required)

    def query(self, query: bytes) -> dict[str, str] | None:
        if not query:
            return {} if self.bare else None
        if not self.allowed:
            return None
        q = dict(parse_qsl(query.decode("latin-1")))
        allowed = self.allowed
        for name, value in q.items():
            p = allowed.get(name)
            if p is None or not p.accepts(value):
                return None
        for name in self.required:
            if name not in q:
                return None
        return q


_INDEX: dict[tuple[str, int], list[_Shape]] = {}
for _r in ROUTES:
    _INDEX.setdefault((_r.method, len(_r.segments)), []).append(_Shape(_r))


def match(method: str, path: str, query: bytes) -> tuple[str, list[str], dict[str, str]] | None:
    """(route, path parameters, query) of a request that is exactly a hot route's shape,
    else None."""
    parts = path.split("/")
    for shape in _INDEX.get((method, len(parts)), ()):
        for i, s in shape.literals:
            if parts[i] != s:
                break
        else:
            q = shape.query(query)
            if q is None:
                return None
            return shape.route.path, [parts[i] for i in shape.params], q
    return None


def haproxy_edge_acl() -> str:
    """The path regex of the routes HAProxy's edge answers from its cache."""
    shapes = [r.path_regex()[1:-1] for r in ROUTES if r.edge]
    return "^(" + "|".join(shapes) + ")$"


def haproxy_side_rules() -> str:
    """HAProxy's frontend rules that send the side server routes to the side server while it is
    up (`ep_side_up`); the edge routes reach it through the edge's misses instead."""
    out = []
    for n, r in enumerate(r for r in ROUTES if r.side and not r.edge):
        cond = f"ep_side_up {{ method {r.method} }} ep_side_p{n}"
        body = " { req.hdr(content-type) -m beg application/json }" if r.json_body else ""
        out.append(f"    acl ep_side_p{n} path_reg {r.path_regex()}\n")
        if r.takes_no_query():
            out.append(f"    use_backend ep_side if {cond} !{{ query -m found }}{body}\n")
        q = r.query_regex()
        if q is not None:
            out.append(f"    use_backend ep_side if {cond} {{ query -m reg {q} }}{body}\n")
    return "".join(out)
