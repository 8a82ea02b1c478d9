"""Shared logic: data, post-processing, metrics, runners, export, CLI plumbing."""
