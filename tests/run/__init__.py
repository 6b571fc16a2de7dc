"""Tests of flux_lightning/run/."""
