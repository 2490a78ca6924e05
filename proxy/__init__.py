"""Sluice: a sidecar proxy for the Amazon Bedrock runtime API."""

__version__ = "0.1.0"
