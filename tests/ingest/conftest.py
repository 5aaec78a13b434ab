"""Ingest tests share the root fixtures (key, cohort, ingested dataset)."""
