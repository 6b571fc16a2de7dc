"""Tests of flux_lightning/ui/."""
