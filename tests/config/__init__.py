"""Tests of flux_lightning/config/."""
