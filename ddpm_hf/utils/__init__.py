"""Helpers below every other part of ddpm_hf (they import nothing from it)."""
