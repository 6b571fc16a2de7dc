"""Tests of flux_lightning/adapters/."""
