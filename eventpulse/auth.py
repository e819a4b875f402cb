"""Bearer tokens: HS256 JWTs carrying the user id (`sub`) and roles.

Minting is for local use (the CLI, tests, the load generator); in production the
identity provider mints with the same shared secret and Event-Pulse only verifies.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import jwt
import orjson

from eventpulse.errors import Unauthorized
from eventpulse.settings import Settings

ALGORITHM = "HS256"
ROLES = ("user", "organizer", "admin")
LEEWAY_S = 5  # clock skew allowed on `exp`, `nbf` and `iat`


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str
    roles: frozenset[str]
    expires_at: float = float("inf")  # the token's `exp`: how long a verification holds

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles

    @property
    def is_organizer(self) -> bool:
        return "organizer" in self.roles or "admin" in self.roles


class NoSecret(Exception):
    """No token secret is configured and no instance has made one."""


SECRET_FILE = "token_secret"


def token_secret(settings: Settings, *, create: bool = False) -> str:
    """The configured secret, or in development the random one kept in the data directory.

    Keeping it on disk lets `eventpulse token` and the running app agree without the
    secret ever appearing in code or logs. Only `eventpulse up` passes `create=True`:
    anything else that finds no secret raises `NoSecret`, instead of minting tokens with
    a secret of its own that the running instance would refuse.
    """
    if settings.token_secret is not None:
        return settings.token_secret.get_secret_value()
    path = Path(settings.data_dir).resolve() / SECRET_FILE
    if path.exists():
        return path.read_text().strip()
    if not create:
        raise NoSecret(f"no token secret in {path.parent}: start an instance there with "
                       "`eventpulse up` (or pass --data-dir / EVENTPULSE_DATA_DIR naming "
                       "the instance's), or set EVENTPULSE_TOKEN_SECRET")
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(48)
    path.touch(mode=0o600)
    path.write_text(value)
    return value


def mint_token(user_id: str, roles: list[str] | tuple[str, ...] = (), *, secret: str,
               ttl_s: int = 12 * 3600, now: float | None = None) -> str:
    """Sign a token for `user_id` with `roles` (subset of ROLES)."""
    now = time.time() if now is None else now
    claims = {"sub": user_id, "roles": sorted(set(roles)), "iat": int(now), "nbf": int(now),
              "exp": int(now + ttl_s)}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify_token(token: str, *, secret: str) -> Principal:
    """Check signature, algorithm and time claims; raise Unauthorized on any doubt."""
    try:
        claims = jwt.decode(token, secret, algorithms=[ALGORITHM],
                            options={"require": ["sub", "exp"]}, leeway=LEEWAY_S)
    except jwt.PyJWTError as e:
        raise Unauthorized(f"invalid token: {type(e).__name__}") from None
    return _principal_of(claims)


def _principal_of(claims: dict) -> Principal:
    sub = claims.get("sub")
    roles = claims.get("roles", [])
    if not isinstance(sub, str) or not sub or len(sub) > 128 or not isinstance(roles, list):
        raise Unauthorized("invalid token claims")
    return Principal(sub, frozenset(r for r in roles if r in ROLES), float(claims["exp"]))


# What the node's HAProxy adds to a request whose bearer token's HS256 signature it checked
# (`cluster/haproxy.py`): the signature it checked, and a value only holders of the secret
# can know, so a client cannot claim a check that was not made.
VOUCHED_SIGNATURE = b"x-ep-verified"
VOUCHED_PROOF = b"x-ep-proof"
_HEADER_KEYS = frozenset({"alg", "typ", "kid"})
_CLAIM_KEYS = frozenset({"sub", "roles", "iat", "nbf", "exp"})


def edge_proof(secret: str) -> str:
    """The proof HAProxy sends with a token it verified, derived from the token secret."""
    return hmac.new(secret.encode(), b"eventpulse edge: bearer signature verified",
                    hashlib.sha256).hexdigest()


def vouched_principal(token: str, now: float | None = None) -> Principal | None:
    """The caller of a token whose signature the node's HAProxy has checked, or None.

    PyJWT spends ~100 µs on a token it has not seen (it checks each base64 character in
    Python and prepares the key on every call): on a join, a new user's first request,
    that was ~27 % of the replica's time. With the signature checked by HAProxy in C,
    what is left is the claims. Only the plain shape is taken here — the header and the
    claims `mint_token` writes, integers well inside the time limits; anything else
    answers None and goes to `verify_token`, so this never accepts a token PyJWT would
    refuse."""
    now = time.time() if now is None else now
    try:
        head, payload, _ = token.split(".")
        header = orjson.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
        claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except ValueError:  # binascii.Error and orjson's errors are ValueErrors
        return None
    if not isinstance(header, dict) or header.get("alg") != ALGORITHM or \
            not header.keys() <= _HEADER_KEYS or \
            not all(isinstance(v, str) for v in header.values()):
        return None
    if not isinstance(claims, dict) or not claims.keys() <= _CLAIM_KEYS:
        return None
    times = [claims.get(k) for k in ("exp", "nbf", "iat")]
    if not all(t is None or type(t) is int for t in times) or times[0] is None:
        return None
    exp, nbf, iat = times
    # a second inside PyJWT's own limits (exp <= now - leeway is expired; nbf or iat
    # > now + leeway is not yet valid), so a token at the edge goes to PyJWT
    if exp <= now - LEEWAY_S + 1 or (nbf is not None and nbf > now + LEEWAY_S - 1) or \
            (iat is not None and iat > now + LEEWAY_S - 1):
        return None
    try:
        return _principal_of(claims)
    except Unauthorized:
        return None
