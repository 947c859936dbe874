"""Bounds on a network over an input set: the dual network (Algorithm 1, Theorem 1), slopes, interval bounds."""
