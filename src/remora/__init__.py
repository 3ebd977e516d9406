"""Remora: a service mesh sidecar stack implementing Istio's sidecar traffic interception."""

__version__ = "0.1.0"
