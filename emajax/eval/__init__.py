"""Evaluation: the LLM judge, general and in-domain EM evals, benign tasks (OpSwap, GSM8K), statistics.

Modules stay import-light: ``judge``, ``stats``, ``questions`` and ``opswap`` need only the standard library,
numpy and yaml, so a report or a judge-only rerun never loads jax.
"""
