"""Bearer tokens: HS256 JWTs carrying the user id (`sub`) and roles.

Minting is for local use (the CLI, tests, the load generator); in production the
identity provider mints with the same shared secret and Event-Pulse only verifies.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import jwt

from eventpulse.errors import Unauthorized
from eventpulse.settings import Settings

ALGORITHM = "HS256"
ROLES = ("user", "organizer", "admin")


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


def token_secret(settings: Settings) -> str:
    """The configured secret, or in development a random one kept in the data directory.

    Keeping it on disk lets `eventpulse token` and the running app agree without the
    secret ever appearing in code or logs.
    """
    if settings.token_secret is not None:
        return settings.token_secret.get_secret_value()
    path = Path(settings.data_dir).resolve() / "token_secret"
    if path.exists():
        return path.read_text().strip()
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
                            options={"require": ["sub", "exp"]}, leeway=5)
    except jwt.PyJWTError as e:
        raise Unauthorized(f"invalid token: {type(e).__name__}") from None
    sub = claims.get("sub")
    roles = claims.get("roles", [])
    if not isinstance(sub, str) or not sub or len(sub) > 128 or not isinstance(roles, list):
        raise Unauthorized("invalid token claims")
    return Principal(sub, frozenset(r for r in roles if r in ROLES), float(claims["exp"]))
