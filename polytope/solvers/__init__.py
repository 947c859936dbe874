"""Exact solvers: the sparse matrices of eq. (19), the HiGHS LP and MILP, the cvxpy twin, 2-D polytopes."""
