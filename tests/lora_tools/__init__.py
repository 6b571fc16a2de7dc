"""Tests of flux_lightning/lora_tools/."""
