"""Registered model families; each module holds one model as pure functions."""
