"""Tests of flux_lightning/data/."""
