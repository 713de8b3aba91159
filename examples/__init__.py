"""Runnable examples built on the effopd_jax library (not part of the installed package)."""
