"""Admission: may this call go now? One atomic decision over every limit that applies.

The request path calls :meth:`Store.admit` once before forwarding and
:meth:`Store.settle` once after the call ends (also when it fails or is cancelled).
"""

from __future__ import annotations

from proxy.admission.model import LIMIT_NAMES, AdmitPlan, Bucket, Decision
from proxy.admission.protocol import Store, StoreUnavailable

__all__ = [
    "LIMIT_NAMES",
    "AdmitPlan",
    "Bucket",
    "Decision",
    "Store",
    "StoreUnavailable",
]
