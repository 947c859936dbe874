"""Verification: robust loss and certificates, attacks, the cascade of rungs, robust training."""
