"""Tests of flux_lightning/callbacks/."""
