"""Tests of flux_lightning/model/."""
