"""Verifiers: robust loss and certificates, attacks, the cascade, branch and bound, properties, robust training."""
