"""``quantforge publish --repo ORG/NAME ARTIFACT...``: one commit with every artifact and a generated model card."""

from __future__ import annotations

import sys
from typing import Any

from ._common import out


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "publish", help="push artifacts, plan and results to a Hub repo with a generated model card",
        description="Publish GGUF files, bnb4/hf16 folders, plan files (.yaml) and results (.json) to ORG/NAME in "
                    "one commit with a generated README.md. The token comes from HF_TOKEN or 'hf auth login'.")
    p.add_argument("artifacts", nargs="+", metavar="ARTIFACT",
                   help=".gguf files, checkpoint folders (uploaded under a subfolder of their name), plan .yaml files, "
                        "a results .json")
    p.add_argument("--repo", required=True, metavar="ORG/NAME", help="target repo; created if missing")
    p.add_argument("--base-model", metavar="ID",
                   help="base model repo id (default: what the artifacts' metadata names)")
    p.add_argument("--results", metavar="JSON", help="results file from 'quantforge eval' (also uploaded)")
    p.add_argument("--private", action="store_true",
                   help="create the repo as private (an existing public repo is refused)")
    p.add_argument("--revision", metavar="BRANCH", default=None, help="branch to commit to (default main; created "
                   "from main if missing)")
    p.add_argument("--relation", choices=("quantized", "finetune", "adapter", "merge"),
                   help="base_model_relation in the card (default: adapter for adapter folders, else quantized)")
    p.add_argument("--license", metavar="ID", help="license id for the card (default: the artifacts' own license)")
    p.add_argument("--dry-run", action="store_true", help="print the exact commit and card; no network access")
    p.add_argument("--force", action="store_true",
                   help="publish despite a failed regression gate, and overwrite files that exist on the remote")
    p.add_argument("--endpoint", metavar="URL", help="Hub endpoint (default: HF_ENDPOINT or https://huggingface.co)")
    p.set_defaults(func=run)


def run(args: Any) -> int:
    from quantforge.hub import format_commit, prepare_publish, push

    plan = prepare_publish(args.repo, args.artifacts, base_model=args.base_model, results=args.results,
                           revision=args.revision, private=args.private, force=args.force,
                           relation=args.relation, license=args.license)
    for warning in plan.warnings:
        print(f"quantforge publish: warning: {warning}", file=sys.stderr)
    if args.dry_run:
        out(format_commit(plan))
        return 0
    result = push(plan, endpoint=args.endpoint)
    if not result.changed:
        out(f"nothing to publish: {args.repo}@{plan.revision} already holds these exact {result.files} files")
        return 0
    created = " (new repo)" if result.created_repo else ""
    out(f"published {result.files} files to {args.repo}@{plan.revision}{created}: {result.commit_url}")
    return 0
