"""Tests of flux_lightning/simpletuner/."""
