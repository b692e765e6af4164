"""Drift types, one file each; registered in :mod:`simlab.data.drift`."""
