"""The model card (README.md) of a published repo: what each artifact is, how good it is, and how to run it.

Everything here is local and pure: artifacts are described from their own files (GGUF metadata, a folder's
``config.json`` / ``README.md``), results come from the ``quantforge eval`` JSON (schema 1), and
:func:`render_card` turns them into Markdown with YAML metadata the Hub understands. Nothing is uploaded here;
:mod:`quantforge.hub` does that.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PublishError

# License identifiers the Hub accepts in the ``license`` field; anything else becomes ``other`` + ``license_name``.
HUB_LICENSES = frozenset("""
apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0 bigcode-openrail-m
afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc cc0-1.0 cc-by-2.0 cc-by-2.5
cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0
cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0 cdla-permissive-1.0
cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0
lgpl lgpl-2.1 lgpl-3.0 isc h-research intel-research lppl-1.3c ms-pl apple-ascl apple-amlr mpl-2.0 odc-by odbl
openrail++ osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib pddl lgpl-lr deepfloyd-if-license llama2 llama3 llama3.1
llama3.2 llama3.3 llama4 gemma unknown other
""".split())

RELATIONS = ("quantized", "finetune", "adapter", "merge")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", re.S)
_TASK_METRIC = re.compile(r"^(?P<task>.+)_(?P<kind>acc|acc_norm)$")
_FORMAT_NAMES = {"gguf": "GGUF", "bnb4": "bitsandbytes 4-bit", "hf16": "safetensors", "adapter": "LoRA adapter"}


@dataclass
class Artifact:
    """One published artifact: a GGUF file or a checkpoint folder, with what the card needs to know about it.

    ``files`` lists ``(path_in_repo, local_path)`` for every file uploaded for it (one for a GGUF, the folder's
    files under ``<folder name>/`` otherwise). ``sources`` maps a fact (``base_model``, ``license``,
    ``license_name``, ``license_link``) to ``(value, where it was read)``.
    """

    local: Path
    kind: str
    name: str
    files: list[tuple[str, Path]]
    size_bytes: int
    bpw: float | None
    type: str
    sources: dict[str, tuple[str, str]] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def path_in_repo(self) -> str:
        return self.name if self.kind == "gguf" else f"{self.name}/"


@dataclass
class SideFile:
    """A plan (``.yaml``) or results (``.json``) file uploaded next to the artifacts, with its parsed content."""

    local: Path
    role: str
    data: Any

    @property
    def name(self) -> str:
        return self.local.name


@dataclass
class Results:
    """A ``quantforge eval`` results file (schema 1): per-artifact metrics plus the optional regression gate."""

    file: SideFile
    entries: list[dict[str, Any]]
    gate: dict[str, Any] | None

    @property
    def data(self) -> dict[str, Any]:
        return self.file.data

    def entry_for(self, artifact: Artifact) -> dict[str, Any] | None:
        """The results entry whose ``path`` is this artifact (same resolved path, else same file/folder name)."""
        target = artifact.local.resolve()
        for entry in self.entries:
            if Path(str(entry["path"])).expanduser().resolve() == target:
                return entry
        named = [e for e in self.entries if _basename(str(e["path"])) == artifact.local.name]
        if len(named) > 1:
            raise PublishError(f"{len(named)} entries of {self.file.name} are named {artifact.local.name!r}; expected "
                               "one per artifact; pass the artifact by the path recorded in the results file")
        return named[0] if named else None


def _basename(path: str) -> str:
    return path.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]


def repo_id_from(value: Any) -> str | None:
    """``ORG/NAME`` from a repo id or a ``https://huggingface.co/ORG/NAME`` URL; ``None`` for anything else
    (local paths, other hosts, dataset or space URLs)."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    if re.match(r"^[a-z]+://", text):
        m = re.match(r"^https?://(www\.)?(huggingface\.co|hf\.co)/(?P<rest>[^?#]+)", text)
        parts = [p for p in m.group("rest").split("/") if p] if m else []
        text = "/".join(parts[:2]) if len(parts) >= 2 and parts[0] not in ("datasets", "spaces") else ""
    if not _REPO_ID.match(text) or os.path.exists(text) or ".." in text:
        return None
    return text


def _gguf_fields(path: Path) -> dict[str, Any]:
    """The ``general.*`` and ``quantize.*`` metadata of a GGUF file, in full (arrays as lists)."""
    from .gguf_reader import open_gguf

    reader = open_gguf(path)
    out: dict[str, Any] = {}
    for key, fld in reader.fields.items():
        if key.startswith(("general.", "quantize.")):
            out[key] = fld.contents()
        elif key == "tokenizer.chat_template":
            out[key] = True
    return out


def _front_matter(readme: Path) -> dict[str, Any]:
    import yaml

    if not readme.is_file():
        return {}
    m = _FRONT_MATTER.match(readme.read_text(encoding="utf-8", errors="replace"))
    if not m:
        return {}
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def describe_artifact(path: str | os.PathLike[str]) -> Artifact:
    """Describe a ``.gguf`` file or a bnb4 / hf16 / adapter folder (size, bpw, type, base model and license)."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return _describe_gguf(p)
    if p.is_dir():
        return _describe_folder(p)
    raise PublishError("expected a .gguf file or a checkpoint folder", path=p)


def _describe_gguf(p: Path) -> Artifact:
    import gguf

    from .inspect import describe

    report = describe(p)
    meta = _gguf_fields(p)
    art = Artifact(local=p, kind="gguf", name=p.name, files=[(p.name, p)], size_bytes=p.stat().st_size,
                   bpw=report.bpw if report.tensors else None, type=_gguf_type(meta, report, gguf))
    for key in ("general.source.repo_url", "general.base_model.0.repo_url", "general.name"):
        if key == "general.base_model.0.repo_url" and meta.get("general.base_model.count", 1) != 1:
            continue
        repo = repo_id_from(meta.get(key))
        if repo:
            art.sources["base_model"] = (repo, f"{key} of {p.name}")
            break
    for fact, key in (("license", "general.license"), ("license_name", "general.license.name"),
                      ("license_link", "general.license.link")):
        if isinstance(meta.get(key), str) and meta[key].strip():
            art.sources[fact] = (meta[key].strip(), f"{key} of {p.name}")
    art.notes["chat_template"] = bool(meta.get("tokenizer.chat_template"))
    art.notes["imatrix"] = {k.removeprefix("quantize.imatrix."): v for k, v in meta.items()
                            if k.startswith("quantize.imatrix.")}
    return art


def _gguf_type(meta: dict[str, Any], report: Any, gguf: Any) -> str:
    from .inspect import mix_label

    label = mix_label(report)
    if label:
        return label
    ft = meta.get("general.file_type")
    if isinstance(ft, int):
        try:
            return gguf.LlamaFileType(ft).name.lower().removeprefix("mostly_").removeprefix("all_")
        except ValueError:
            pass
    by_type: dict[str, int] = {}
    for t in report.tensors:
        by_type[t.type] = by_type.get(t.type, 0) + t.nbytes
    return max(by_type, key=by_type.__getitem__) if by_type else "unknown"


def _folder_files(p: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """``(path_in_repo, local)`` for every file under ``p``, and the hidden ones left out (``.partial`` leftovers)."""
    files, hidden = [], []
    for root, dirs, names in os.walk(p):
        hidden += [f"{p.name}/{(Path(root) / d).relative_to(p).as_posix()}/" for d in dirs if d.startswith(".")]
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in sorted(names):
            rel = f"{p.name}/{(Path(root) / n).relative_to(p).as_posix()}"
            if n.startswith("."):
                hidden.append(rel)
            else:
                files.append((rel, Path(root) / n))
    return files, sorted(hidden)


def _describe_folder(p: Path) -> Artifact:
    p = p.resolve()
    files, hidden = _folder_files(p)
    size = sum(f.stat().st_size for _, f in files)
    card = _front_matter(p / "README.md")
    if (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
        cfg = _read_json(p / "adapter_config.json")
        art = Artifact(p, "adapter", p.name, files, size, None, str(cfg.get("peft_type", "lora")).lower())
        base = repo_id_from(cfg.get("base_model_name_or_path"))
        if base:
            art.sources["base_model"] = (base, f"base_model_name_or_path in {p.name}/adapter_config.json")
    else:
        from .inspect import describe

        report = describe(p)
        cfg = _read_json(p / "config.json")
        if report.kind == "bnb4":
            q = cfg.get("quantization_config") or {}
            kind, bpw = "bnb4", None
            dtype = str(q.get("bnb_4bit_quant_type", "nf4")) + ("-dq" if q.get("bnb_4bit_use_double_quant") else "")
        else:
            floats = {}
            for t in report.tensors:
                floats[t.type] = floats.get(t.type, 0) + t.nbytes
            kind, bpw, dtype = "hf16", report.bpw, max(floats, key=floats.__getitem__) if floats else "unknown"
        art = Artifact(p, kind, p.name, files, size, bpw, dtype)
        base = repo_id_from(cfg.get("_name_or_path"))
        if base:
            art.sources["base_model"] = (base, f"_name_or_path in {p.name}/config.json")
    if "base_model" not in art.sources:
        base = repo_id_from(card.get("base_model") if isinstance(card.get("base_model"), str) else None)
        if base:
            art.sources["base_model"] = (base, f"base_model in {p.name}/README.md")
    for fact in ("license", "license_name", "license_link"):
        if isinstance(card.get(fact), str) and card[fact].strip():
            art.sources[fact] = (card[fact].strip(), f"{fact} in {p.name}/README.md")
    art.notes["hidden"] = hidden
    return art


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise PublishError(f"expected a readable JSON object ({exc})", path=path) from exc
    if not isinstance(data, dict):
        raise PublishError(f"expected a JSON object, got {type(data).__name__}", path=path)
    return data


def load_plan(path: Path) -> SideFile:
    """A plan file (YAML) uploaded as-is; parsed only to describe how it was made."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise PublishError(f"expected a readable YAML plan file ({type(exc).__name__})", path=path) from exc
    return SideFile(path, "plan", data)


def load_results(path: Path) -> Results:
    """Read and check a results file against schema 1 of ``quantforge eval``."""
    data = _read_json(path)
    if data.get("schema_version") != 1:
        raise PublishError(f"expected results schema_version 1, got {data.get('schema_version')!r}; re-run "
                           "'quantforge eval' with this version", path=path)
    entries = data.get("artifacts")
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "path" in e for e in entries):
        raise PublishError("expected 'artifacts' to be a list of objects with a 'path'", path=path)
    for e in entries:
        metrics = e.get("metrics", {})
        if not isinstance(metrics, dict) or not all(v is None or isinstance(v, (int, float)) for v in metrics.values()):
            raise PublishError(f"expected numeric 'metrics' for artifact {e['path']!r}", path=path)
    gate = data.get("gate")
    if gate is not None and not (isinstance(gate, dict) and isinstance(gate.get("passed"), bool)):
        raise PublishError("expected 'gate' to be an object with a boolean 'passed'", path=path)
    return Results(SideFile(path, "results", data), entries, gate)


def one_fact(artifacts: list[Artifact], fact: str) -> tuple[str, str] | None:
    """The single value of ``fact`` the artifacts agree on (with where it was read), ``None`` if none names it."""
    found = [a.sources[fact] for a in artifacts if fact in a.sources]
    values = sorted({v for v, _ in found})
    if len(values) > 1:
        where = "; ".join(f"{v} ({w})" for v, w in found)
        flag = "--base-model" if fact == "base_model" else "--license"
        raise PublishError(f"the artifacts disagree on {fact}: {where}; pass {flag} to choose one")
    return found[0] if found else None


@dataclass
class CardInfo:
    """Everything the card states, already decided (see :func:`quantforge.hub.prepare_publish`)."""

    repo_id: str
    revision: str
    base_model: str
    relation: str
    license: str | None
    license_name: str | None
    license_link: str | None
    artifacts: list[Artifact]
    plans: list[SideFile]
    results: Results | None
    gate_failures: list[str] = field(default_factory=list)


def card_metadata(info: CardInfo) -> dict[str, Any]:
    """The YAML metadata block: base model and relation, library, license, tags, pipeline."""
    kinds = {a.kind for a in info.artifacts}
    meta: dict[str, Any] = {"base_model": info.base_model, "base_model_relation": info.relation}
    meta["library_name"] = "gguf" if kinds <= {"gguf"} else ("peft" if kinds == {"adapter"} else "transformers")
    if info.license:
        lic = info.license.lower()
        if lic in HUB_LICENSES:
            meta["license"] = lic
        else:
            meta["license"] = "other"
            meta["license_name"] = re.sub(r"[^a-z0-9.]+", "-", (info.license_name or lic).lower()).strip("-")
    if meta.get("license") == "other" and info.license_link:
        meta["license_link"] = info.license_link
    tags = ["quantforge"]
    tags += ["gguf"] if "gguf" in kinds else []
    tags += ["bitsandbytes", "4-bit"] if "bnb4" in kinds else []
    tags += ["safetensors"] if kinds & {"bnb4", "hf16"} else []
    tags += ["quantized"] if info.relation == "quantized" else []
    meta["tags"] = tags
    meta["pipeline_tag"] = "text-generation"
    return meta


def fmt_number(value: Any) -> str:
    """A metric as shown in the table: 6 significant digits (exact for values results files usually hold)."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return format(float(value), ".6g")


def fmt_size(n: int) -> str:
    """A size in decimal units, as the Hub shows them."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def table_rows(info: CardInfo) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the files table, sorted by size (smallest first). Results override local measures."""
    tasks: set[str] = set()
    entries = {}
    for a in info.artifacts:
        entry = info.results.entry_for(a) if info.results else None
        entries[a.name] = entry or {}
        tasks |= {k for k in (entry or {}).get("metrics", {}) if _TASK_METRIC.match(k)}
    task_cols = sorted(tasks)
    header = ["File", "Format", "Type", "Bits/weight", "Size", "KLD mean", "KLD p99", "PPL", "Top-1"]
    header += [k.replace("_", " ") for k in task_cols]
    rows = []
    for a in sorted(info.artifacts, key=lambda a: (a.size_bytes, a.name)):
        e = entries[a.name]
        m = e.get("metrics", {})
        row = [f"`{a.path_in_repo}`", _FORMAT_NAMES[a.kind], str(e.get("type") or a.type),
               fmt_number(e.get("bpw", a.bpw)), fmt_size(a.size_bytes), _with_err(m, "kld_mean", "kld_err"),
               fmt_number(m.get("kld_p99")), _with_err(m, "ppl", "ppl_err"), _with_err(m, "top1", "top1_err")]
        row += [_with_err(m, k, k + "_stderr") for k in task_cols]
        rows.append(row)
    return header, rows


def _with_err(metrics: dict[str, Any], key: str, err_key: str) -> str:
    """``value ± standard error`` when the results hold the error, else the value alone."""
    value, err = metrics.get(key), metrics.get(err_key)
    if value is None or err is None or isinstance(err, bool):
        return fmt_number(value)
    return f"{fmt_number(value)} ± {format(float(err), '.2g')}"


def local_path_free(value: str) -> str:
    """A value safe to publish: an absolute local path (``/home/...``, ``~/...``, ``C:\\...``) becomes its last part,
    so cards never carry a machine's folder layout; anything else is kept."""
    text = value.strip()
    if text.startswith(("/", "~")) or re.match(r"^[A-Za-z]:[\\/]", text):
        return _basename(text) or text
    return value


def _scalars(data: Any, limit: int = 12) -> list[tuple[str, str]]:
    if not isinstance(data, dict):
        return []
    out = []
    for k, v in data.items():
        if isinstance(v, str) and len(v) <= 200:
            out.append((str(k), local_path_free(v)))
        elif isinstance(v, (int, float, bool)):
            out.append((str(k), str(v)))
        elif isinstance(v, list) and v and len(v) <= 8 and all(isinstance(x, (str, int, float)) for x in v):
            out.append((str(k), ", ".join(map(str, v))))
        if len(out) >= limit:
            break
    return out


def _provenance(info: CardInfo) -> list[str]:
    lines: list[str] = []
    for plan in info.plans:
        data = plan.data if isinstance(plan.data, dict) else {}
        settings = [f"{k} `{v}`" for k, v in _scalars(data)]
        lines.append(f"- Plan `{plan.name}`" + (": " + ", ".join(settings) + "." if settings else "."))
        calib = [f"{k.replace('_', ' ')}: `{v}`" for k, v in _scalars(data.get("calibration"))]
        if calib:
            lines.append("  - Calibration: " + "; ".join(calib) + ".")
        sized = {k: len(v) for k, v in data.items() if isinstance(v, (list, dict)) and len(v) > 8}
        for k, n in sized.items():
            lines.append(f"  - `{k}`: {n} entries (see the file).")
    for a in info.artifacts:
        imat = a.notes.get("imatrix") or {}
        if imat:
            parts = [f"{k.replace('_', ' ')} `{', '.join(map(str, v)) if isinstance(v, list) else v}`"
                     for k, v in sorted(imat.items())]
            lines.append(f"- `{a.name}` was quantized with an importance matrix: " + ", ".join(parts) + ".")
    if info.results:
        data = info.results.data
        calib = [f"{k.replace('_', ' ')}: `{v}`" for k, v in _scalars(data.get("calibration"))]
        if calib:
            lines.append("- Calibration (from the results file): " + "; ".join(calib) + ".")
    if not lines:
        lines.append("- The published files do not record how the quantization plan was made.")
    return lines


def _evaluation(info: CardInfo) -> list[str]:
    if info.results is None:
        return ["No evaluation results were published with these files; quality columns read n/a."]
    data = info.results.data
    ref = data.get("reference")
    ref_text = ref if isinstance(ref, str) else next(
        (str(ref[k]) for k in ("name", "model", "path") if isinstance(ref, dict) and ref.get(k)), None)
    lines = [f"Metrics come from `{info.results.file.name}` (written by `quantforge eval`). KL divergence (mean and "
             "99th percentile), perplexity and top-1 agreement compare each file with the reference"
             + (f" `{ref_text}`" if ref_text else "") + " on the same tokens; task columns are lm-eval accuracies."]
    extra = [f"{k.replace('_', ' ')} `{v}`" for k, v in _scalars(data) if k != "schema_version"]
    if extra:
        lines.append("Settings: " + ", ".join(extra) + ".")
    lines += _sample_sizes(data)
    gate = info.results.gate
    if gate is not None:
        lines.append("Regression gate: " + ("passed." if gate["passed"] else "**failed**."))
    return lines


def _sample_sizes(data: dict[str, Any]) -> list[str]:
    """How much text and how many documents the numbers rest on, and what the ± figures are."""
    settings = data.get("settings") if isinstance(data.get("settings"), dict) else {}
    ref = data.get("reference") if isinstance(data.get("reference"), dict) else {}
    n_tokens = (ref.get("metrics") or {}).get("n_tokens") if isinstance(ref.get("metrics"), dict) else None
    lines = []
    if settings.get("n_chunks"):
        text = local_path_free(str(settings.get("text_name") or settings.get("text") or "the text"))
        lines.append(f"Sample sizes: KLD, perplexity and top-1 rest on {settings['n_chunks']} chunks of "
                     f"{settings.get('n_ctx', '?')} tokens of `{text}`"
                     + (f" ({n_tokens} scored tokens)" if n_tokens else "") + ".")
    tasks = data.get("tasks") if isinstance(data.get("tasks"), dict) else {}
    sized = [f"{name} {info.get('n_samples')} documents" for name, info in tasks.items()
             if isinstance(info, dict) and info.get("n_samples")]
    if sized:
        lines.append("Task accuracies rest on " + ", ".join(sized) + (
            f" (limit {settings['limit']} per task)" if settings.get("limit") else "") + ".")
    if lines:
        lines.append("Figures after ± are standard errors; differences smaller than about twice them are noise.")
    return lines


def _usage(info: CardInfo) -> list[str]:
    repo, out = info.repo_id, []
    ggufs = sorted((a for a in info.artifacts if a.kind == "gguf"), key=lambda a: a.size_bytes)
    if ggufs:
        pick = ggufs[len(ggufs) // 2]
        tags = ollama_tags(ggufs)
        runs = [f"ollama run hf.co/{repo}:{tags[a.name]}  # {a.name}" for a in ggufs if tags[a.name]]
        out += ["### llama.cpp", "", "```sh", f'llama-cli --hf-repo {repo} --hf-file {pick.name} -p "Hello"',
                f"llama-server --hf-repo {repo} --hf-file {pick.name}", "```", "", "### Ollama", "", "```sh",
                *(runs or [f"ollama run hf.co/{repo}"]), "```", ""]
        if pick.notes.get("chat_template"):
            out += ["The chat template and stop tokens come from the GGUF metadata (`tokenizer.chat_template`).", ""]
        else:
            out += ["This GGUF has no `tokenizer.chat_template`: give Ollama a Modelfile with a `TEMPLATE` and "
                    "`PARAMETER stop` lines for chat use.", ""]
    folders = [a for a in info.artifacts if a.kind in ("bnb4", "hf16")]
    if folders or ggufs:
        out += ["### transformers", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", ""]
        for a in folders:
            extra = "  # needs bitsandbytes" if a.kind == "bnb4" else ""
            out += [f'model = AutoModelForCausalLM.from_pretrained("{repo}", subfolder="{a.name}", '
                    f'torch_dtype="auto"){extra}',
                    f'tokenizer = AutoTokenizer.from_pretrained("{repo}", subfolder="{a.name}")']
        if not folders:
            g = ggufs[len(ggufs) // 2].name
            out += [f'model = AutoModelForCausalLM.from_pretrained("{repo}", gguf_file="{g}")  # dequantized',
                    f'tokenizer = AutoTokenizer.from_pretrained("{repo}", gguf_file="{g}")']
        out += ["```", ""]
    for a in (a for a in info.artifacts if a.kind == "adapter"):
        out += ["### PEFT", "", "```python", "from peft import AutoPeftModelForCausalLM", "",
                f'model = AutoPeftModelForCausalLM.from_pretrained("{repo}", subfolder="{a.name}")', "```", ""]
    return out


def ollama_tags(ggufs: list[Artifact]) -> dict[str, str | None]:
    """The ``hf.co/REPO:TAG`` tag of each GGUF: its type in capitals (``Q4_K_M``, ``Q4_K_M-DYN`` for a plan) when
    that names exactly one file of the repo, so no two files answer to one tag (``None`` otherwise)."""
    out: dict[str, str | None] = {}
    for a in ggufs:
        tag = a.type.upper()
        owners = [b for b in ggufs if _tag_matches(tag, b)]
        out[a.name] = tag if owners == [a] else None
    return out


def _tag_matches(tag: str, artifact: Artifact) -> bool:
    """Whether ``tag`` occurs in the file's name, case-insensitively (as the Hub's Ollama endpoint matches it, so
    ``Q4_K_M`` also names ``model-q4_k_m-dyn.gguf`` and is then withheld from both files)."""
    return tag.lower() in artifact.name.lower()


def render_card(info: CardInfo) -> str:
    """The full README.md: YAML metadata, files table, provenance, evaluation notes and usage snippets."""
    import yaml

    meta = card_metadata(info)
    title = info.repo_id.split("/", 1)[1]
    from . import __version__

    what = {"quantized": "Quantized versions of", "adapter": "An adapter for", "finetune": "Fine-tuned from",
            "merge": "Merged from"}[info.relation]
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", "", f"# {title}", "",
             f"{what} [{info.base_model}](https://huggingface.co/{info.base_model}), made with quantforge "
             f"{__version__}.", ""]
    for failure in info.gate_failures:
        lines += [f"> **Warning:** published with `--force` although the regression gate failed: {failure}", ""]
    if "license" not in meta:
        lines += ["> The source artifacts do not state a license; check the base model's license before use.", ""]
    header, rows = table_rows(info)
    lines += ["## Files", "", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "Sizes are what you download; n/a means not measured.", ""]
    lines += ["## Evaluation", ""] + [x for para in _evaluation(info) for x in (para, "")]
    lines += ["## How these files were made", ""] + _provenance(info) + [""]
    lines += ["## Usage", ""] + _usage(info)
    return "\n".join(lines).rstrip() + "\n"
