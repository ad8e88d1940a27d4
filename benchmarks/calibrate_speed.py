"""Calibration speed as a user sees it: ``quantforge calibrate`` of the Llama-3.1-8B-shaped checkpoint of
``export_speed.py`` (random bf16 weights on local disk, SmolLM2 tokenizer) with the default settings and 64 x 512
calibration tokens, timed as a subprocess (wall time, peak RSS), with each stage's time as the command itself
records it (``seconds`` in ``sensitivity.json``: model load, imatrix pass, proxies, sensitivity measurement).

    python benchmarks/calibrate_speed.py --dir /tmp/l8b --tokenizer .bench/qlora/smollm2 \\
        --data ../shared/data/wikitext-2/wiki.valid.raw [--device cuda] [--tokens 32768] [--ctx 512] [--layers 32]

The checkpoint is shared with ``export_speed.py`` (same ``--dir``: built once, reused). The calibration folder
``DIR/cal`` keeps ``imatrix.gguf``, which ``export_speed.py --imatrix DIR/cal/imatrix.gguf --types iq2_xxs`` takes.
A cached folder would make the run a no-op, so the folder is emptied first. The command's progress bars (per layer or
measured pair, with elapsed time) are kept on (``QUANTFORGE_PROGRESS=1``: its output is a pipe, not a terminal), so
a run stopped early still shows how far each stage got.
Goal: under 10 minutes in total.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import measure, table  # noqa: E402
from export_speed import QF, add_checkpoint_args, checkpoint_from_args  # noqa: E402

GOAL_S = 600.0


def main() -> None:
    ap = argparse.ArgumentParser()
    add_checkpoint_args(ap, calibration=True)
    args = ap.parse_args()
    work = Path(args.dir)
    model = checkpoint_from_args(args)
    cal = work / "cal"
    shutil.rmtree(cal, ignore_errors=True)
    cmd = [*QF, "calibrate", str(model), "--data", str(args.data), "--tokens", str(args.tokens), "--ctx",
           str(args.ctx), "--device", args.device, "-o", str(cal)]
    wall, rss = measure(cmd, env={"QUANTFORGE_PROGRESS": "1"}, echo=True)
    sens = json.loads((cal / "sensitivity.json").read_text())
    stages = sens["seconds"]
    rows = [[f"stage: {k}", v] for k, v in stages.items()]
    rows.append(["stages, total", round(sum(stages.values()), 1)])
    rows.append(["whole command (wall, incl. start-up and writes)", wall])
    print(f"\ncommand: quantforge {' '.join(cmd[len(QF):])}")
    print(f"Llama-3.1-8B-shaped ({args.layers} layers), {sens['calibration']['chunks']} x {args.ctx} calibration "
          f"tokens, {sens['holdout']['tokens']} held-out tokens, {sens['n_measured']} (tensor, format) pairs "
          f"measured, device {sens['device']}, peak RSS {rss:.0f} MiB")
    print(table(["what", "seconds"], rows))
    verdict = "met" if wall < GOAL_S else "MISSED"
    print(f"goal: under {GOAL_S / 60:.0f} minutes in total: {verdict} ({wall / 60:.1f} min)")
    print(f"imatrix for export_speed.py --imatrix: {cal / 'imatrix.gguf'}")


if __name__ == "__main__":
    main()
