"""Admission: may this call go now? One atomic decision over every limit that applies.

The request path calls :meth:`Store.admit` once before forwarding and
:meth:`Store.settle` once after the call ends (also when it fails or is cancelled).
"""

from __future__ import annotations

from proxy.admission.model import LIMIT_NAMES, AdmitPlan, Bucket, Decision
from proxy.admission.protocol import Store, StoreUnavailable
from proxy.admission.store import EmbeddedStore, RedisStore, open_store

__all__ = [
    "LIMIT_NAMES",
    "AdmitPlan",
    "Bucket",
    "Decision",
    "EmbeddedStore",
    "RedisStore",
    "Store",
    "StoreUnavailable",
    "open_store",
]
