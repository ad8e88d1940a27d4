"""lm-eval's command line with quantforge's backends registered: ``python -m quantforge.evals.lm_eval_main ...``.

lm-eval discovers models only through its registry, so its own ``lm_eval`` script cannot see ``qf-*`` names.
This wrapper registers them and hands over to lm-eval's CLI unchanged, e.g.::

    python -m quantforge.evals.lm_eval_main run --model qf-gguf \\
        --model_args path=smollm2.q4_k_m.gguf,engine=torch --tasks qf_arc_easy --limit 50 \\
        --include_path "$(python -c 'from quantforge.evals.lm_eval_runner import TASKS_DIR; print(TASKS_DIR)')"

In Python, ``from quantforge.evals.lm_backends import register; register()`` does the same before
``lm_eval.simple_evaluate(model="qf-hf", model_args="path=...")``.
"""

from __future__ import annotations


def main() -> None:
    """Register ``qf-hf``, ``qf-bnb4``, ``qf-gguf``, then run lm-eval's CLI on ``sys.argv``."""
    from lm_eval.__main__ import cli_evaluate

    from .lm_backends import register

    register()
    cli_evaluate()


if __name__ == "__main__":
    main()
