"""Stateless building blocks of the model: each a pure function of arrays."""
