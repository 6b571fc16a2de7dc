"""Tests of flux_lightning/training/."""
