"""Evaluation of artifacts: PPL, KL divergence and top-1 agreement against a reference, lm-eval tasks through our
backends (``qf-hf``, ``qf-bnb4``, ``qf-gguf``), a versioned results file and a CI regression gate.

Importing this package does nothing heavy and registers nothing; see :mod:`.lm_backends` for registration.
Modules: ``metrics`` (pure math), ``engines`` (models -> logits), ``distribution`` (chunked PPL/KLD plumbing),
``lm_backends`` / ``lm_eval_runner`` / ``lm_eval_main`` (lm-eval), ``data`` and ``tasks/`` (offline tasks),
``artifacts``, ``schema``, ``report``, ``gate`` and ``runner`` (what ``quantforge eval`` runs).
"""
