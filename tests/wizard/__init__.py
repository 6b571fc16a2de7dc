"""Tests of flux_lightning/wizard/."""
