"""Metrics test helpers: a fresh job key, reading a sample from the registry, the spans and outcomes recorded."""

from __future__ import annotations

import uuid
from collections import Counter

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY, CollectorRegistry

from hyperion_lock.metrics import (
    metrics,
)


def sample(name: str, registry: CollectorRegistry = REGISTRY, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def new_key() -> str:
    return f"metrics-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> InMemorySpanExporter:
    """The library's spans go to an SDK tracer with an in-memory exporter for this test."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(metrics, "_tracer", provider.get_tracer("test"))
    monkeypatch.setattr(metrics, "_traced", True)
    return exporter


def spans_of(exporter: InMemorySpanExporter, name: str, key: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans()
            if s.name == name and s.attributes is not None and s.attributes.get("hyperion_lock.key") == key]


def outcomes_of(found: list[ReadableSpan]) -> Counter[str]:
    return Counter(str((s.attributes or {}).get("hyperion_lock.outcome")) for s in found)

