"""Diagnostics: alignment metrics for Tacotron2 attention and pictures of it."""
