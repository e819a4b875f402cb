"""Payment gateways, called in batch by the purchase job before it commits.

No card data is stored: a purchase carries only the provider's payment reference.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Protocol

TEST_OK_PREFIX = "test_ok_"
TEST_DECLINE_PREFIX = "test_decline_"


class PaymentGateway(Protocol):
    async def charge_many(self, charges: list[dict]) -> list[tuple[bool, str]]:
        """Charge each {purchase_id, amount, payment_reference}; (approved, reason) per item."""
        ...


class TestModeGateway:
    """Accepts references starting `test_ok_`, declines `test_decline_` and anything else."""

    async def charge_many(self, charges: list[dict]) -> list[tuple[bool, str]]:
        out = []
        for c in charges:
            ref = c["payment_reference"]
            if ref.startswith(TEST_OK_PREFIX):
                out.append((True, "approved"))
            elif ref.startswith(TEST_DECLINE_PREFIX):
                out.append((False, "payment declined by the test gateway"))
            else:
                out.append((False, f"test mode accepts only references starting {TEST_OK_PREFIX!r}"))
        return out


def sign_webhook(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_webhook(secret: str, body: bytes, signature: str) -> bool:
    """Constant-time check of a provider's HMAC-SHA256 signature over the raw body."""
    return hmac.compare_digest(sign_webhook(secret, body), signature.strip().lower())


def get_gateway() -> PaymentGateway:
    return TestModeGateway()
