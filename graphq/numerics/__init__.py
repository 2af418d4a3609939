"""Numeric kernels: small pure-numpy functions with no graph code (calibration statistics, ranges)."""
