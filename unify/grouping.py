"""Grouping methods: which experts of a layer share a united expert. Every method returns equal-size groups."""
from __future__ import annotations
# (implementations to come; see the registry contract below)
