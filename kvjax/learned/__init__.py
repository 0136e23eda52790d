"""Learned compression components (retention gates, Locret)."""
