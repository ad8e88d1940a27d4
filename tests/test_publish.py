"""``quantforge publish``: the real huggingface_hub client against a strict fake Hub on 127.0.0.1.

Artifacts are built here (a tiny GGUF with ``gguf.GGUFWriter``, fake bnb4 / hf16 folders), so these tests depend on
no exporter. Uploads take the client's legacy LFS path (``HF_HUB_DISABLE_XET``), which the fake Hub implements.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from quantforge.cli.main import main
from helpers.fake_hub import FakeHub

TOKEN = "hf_TestTokenDoNotLeak0123456789abcdef"
BASE = "HuggingFaceTB/SmolLM2-135M"
REPO = "quantforge-test/SmolLM2-135M-GGUF"
CHUNK = 256 * 1024
# huggingface_hub's LFS upload passes a file object as data=..., which httpx2 flags as deprecated: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


def make_gguf(path: Path, qtype: str, rows: int, *, base_url: str | None = f"https://huggingface.co/{BASE}",
              license: str | None = "apache-2.0", name: str = "SmolLM2 135M") -> Path:
    """A one-tensor GGUF (q8_0 or f16) with name, license, base model, file type and a chat template."""
    import gguf
    import numpy as np

    data = np.random.default_rng(rows).standard_normal((rows, 512)).astype(np.float32)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    if license:
        w.add_license(license)
    if base_url:
        w.add_base_model_count(1)
        w.add_base_model_repo_url(0, base_url)
    w.add_string("tokenizer.chat_template", "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    if qtype == "q8_0":
        w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
        w.add_array("quantize.imatrix.datasets", ["wiki.valid.raw"])
        w.add_uint32("quantize.imatrix.chunks_count", 64)
        q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor("token_embd.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
        w.add_tensor("token_embd.weight", data.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def make_folder(path: Path, kind: str) -> Path:
    """A bnb4 or hf16 checkpoint folder: config.json (+ quantization_config), a small safetensors, a README."""
    import numpy as np
    from safetensors.numpy import save_file

    path.mkdir()
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "_name_or_path": BASE}
    if kind == "bnb4":
        cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                      "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": False}
        tensors = {"model.layers.0.mlp.down_proj.weight": np.arange(4096, dtype=np.uint8).reshape(2048, 2),
                   "model.layers.0.mlp.down_proj.weight.absmax": np.ones(64, dtype=np.float32)}
    else:
        tensors = {"model.layers.0.mlp.down_proj.weight": np.ones((64, 64), dtype=np.float16)}
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "README.md").write_text("---\nlicense: apache-2.0\n---\n# source card\n")
    (path / ".partial-leftover").write_text("not uploaded")
    save_file(tensors, str(path / "model.safetensors"))
    return path


@pytest.fixture()
def arts(tmp_path: Path) -> dict[str, Path]:
    """Two GGUFs, a bnb4 folder, a plan and a results file whose numbers the card must reproduce."""
    d = tmp_path / "out"
    d.mkdir()
    q8 = make_gguf(d / "SmolLM2-135M-Q8_0.gguf", "q8_0", 1024)
    f16 = make_gguf(d / "SmolLM2-135M-F16.gguf", "f16", 256)
    bnb = make_folder(d / "bnb4", "bnb4")
    plan = d / "plan.yaml"
    plan.write_text("version: 1\ntarget: gguf\nbpw: 4.0\ncalibration:\n  data: wiki.valid.raw\n  tokens: 131072\n"
                    "tensors:\n" + "".join(f"  blk.{i}.ffn_down.weight: q4_k\n" for i in range(12)))
    results = {
        "schema_version": 1, "reference": {"path": "SmolLM2-135M-bf16", "ppl": 29.01},
        "seed": 0, "lm_eval_version": "0.4.9",
        "artifacts": [
            {"path": str(q8), "format": "gguf", "type": "q8_0", "size_bytes": q8.stat().st_size, "bpw": 8.5,
             "metrics": {"kld_mean": 0.00123, "kld_median": 0.0009, "kld_p99": 0.0151, "top1": 0.9876, "ppl": 29.05,
                         "arc_easy_acc": 0.5123, "hellaswag_acc": 0.4011}},
            {"path": "elsewhere/SmolLM2-135M-F16.gguf", "format": "gguf", "type": "f16",
             "size_bytes": f16.stat().st_size, "bpw": 16.0,
             "metrics": {"kld_mean": 1.23456789e-05, "kld_median": 1e-05, "kld_p99": 0.0002, "top1": 0.9991,
                         "ppl": 29.0134, "arc_easy_acc": 0.5201, "hellaswag_acc": 0.4056}},
            {"path": str(bnb), "format": "bnb4", "type": "nf4", "size_bytes": 9000, "bpw": 4.127,
             "metrics": {"kld_mean": 0.0412, "kld_median": 0.03, "kld_p99": 0.3, "top1": 0.9012, "ppl": 31.7,
                         "arc_easy_acc": 0.4877, "hellaswag_acc": 0.3902}},
        ],
        "gate": {"passed": True, "failures": []},
    }
    res = d / "results.json"
    res.write_text(json.dumps(results, indent=1))
    return {"q8": q8, "f16": f16, "bnb": bnb, "plan": plan, "results": res}


def cli_args(arts: dict[str, Path], *extra: str) -> list[str]:
    return ["publish", "--repo", REPO, str(arts["q8"]), str(arts["f16"]), str(arts["bnb"]), str(arts["plan"]),
            "--results", str(arts["results"]), *extra]


@pytest.fixture()
def hub_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Token in HF_TOKEN, no token file, legacy LFS uploads, online mode, quiet progress bars."""
    from huggingface_hub import constants
    from huggingface_hub.utils import disable_progress_bars

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with disable_progress_bars():
        yield


def expected_contents(arts: dict[str, Path], card: str) -> dict[str, bytes]:
    """Every file the commit must contain, by path in the repo, read from disk (hidden files are not uploaded)."""
    want = {"README.md": card.encode()}
    for key in ("q8", "f16", "plan", "results"):
        want[arts[key].name] = arts[key].read_bytes()
    for f in sorted(arts["bnb"].iterdir()):
        if not f.name.startswith("."):
            want[f"bnb4/{f.name}"] = f.read_bytes()
    return want


def sha256s(files: dict[str, bytes]) -> dict[str, str]:
    return {p: hashlib.sha256(b).hexdigest() for p, b in files.items()}


def parse_table(card: str) -> tuple[list[str], list[list[str]]]:
    lines = [ln for ln in card.splitlines() if ln.startswith("| ")]
    split = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return split[0], split[1:]


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_card_metadata_validates_and_table_matches_results(arts):
    from huggingface_hub import ModelCard, ModelCardData

    from quantforge.hub import prepare_publish
    from quantforge.model_card import fmt_size

    plan = prepare_publish(REPO, [str(arts[k]) for k in ("q8", "f16", "bnb", "plan")], results=str(arts["results"]))
    card = ModelCard(plan.card, ignore_metadata_errors=False)
    meta = card.data.to_dict()
    assert meta["base_model"] == BASE and meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "transformers" and meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "text-generation"
    assert {"quantforge", "gguf", "bitsandbytes", "quantized"} <= set(meta["tags"])
    ModelCardData(**meta, ignore_metadata_errors=False)
    assert ModelCard(str(card)).data.to_dict() == meta

    header, rows = parse_table(plan.card)
    results = json.loads(arts["results"].read_text())
    by_name = {Path(e["path"]).name: e for e in results["artifacts"]}
    sizes = {"SmolLM2-135M-Q8_0.gguf": arts["q8"].stat().st_size, "SmolLM2-135M-F16.gguf": arts["f16"].stat().st_size,
             "bnb4": sum(f.stat().st_size for f in arts["bnb"].iterdir() if not f.name.startswith("."))}
    assert [r[0].strip("`/") for r in rows] == sorted(sizes, key=sizes.get)
    cols = {"Bits/weight": "bpw", "KLD mean": "kld_mean", "KLD p99": "kld_p99", "PPL": "ppl", "Top-1": "top1",
            "arc easy acc": "arc_easy_acc", "hellaswag acc": "hellaswag_acc"}
    assert set(cols) <= set(header)
    for row in rows:
        entry = by_name[row[0].strip("`/")]
        cells = dict(zip(header, row))
        assert cells["Type"] == entry["type"] and cells["Size"] == fmt_size(sizes[row[0].strip("`/")])
        for col, key in cols.items():
            value = entry["bpw"] if key == "bpw" else entry["metrics"][key]
            shown, _, err = cells[col].partition(" ± ")
            assert float(shown) == pytest.approx(value, rel=5e-6, abs=0), (row[0], col)
            if len(repr(value)) <= 7:
                assert float(shown) == value
            err_key = {"kld_mean": "kld_err", "ppl": "ppl_err", "top1": "top1_err"}.get(key, key + "_stderr")
            if key != "bpw" and entry["metrics"].get(err_key) is not None:
                assert float(err) == pytest.approx(entry["metrics"][err_key], rel=0.06), (row[0], col)
    assert "calibration" in plan.card.lower() and "131072" in plan.card and "wiki.valid.raw" in plan.card
    assert "`tensors`: 12 entries" in plan.card
    assert f"llama-cli --hf-repo {REPO} --hf-file" in plan.card
    assert f"ollama run hf.co/{REPO}:" in plan.card
    assert f'from_pretrained("{REPO}", subfolder="bnb4"' in plan.card


def test_dry_run_prints_the_exact_commit_without_any_network(arts, monkeypatch, capsys):
    import huggingface_hub

    def no_network(*a, **k):
        raise AssertionError("dry run touched the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(huggingface_hub.HfApi, "__init__", no_network)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert main(cli_args(arts, "--dry-run")) == 0
    text = capsys.readouterr().out
    from quantforge.hub import prepare_publish

    plan = prepare_publish(REPO, [str(arts[k]) for k in ("q8", "f16", "bnb", "plan")], results=str(arts["results"]))
    want = expected_contents(arts, plan.card)
    for path, content in want.items():
        assert re.search(rf"^  {re.escape(path)}\s+{len(content):,} bytes", text, re.M), path
    assert f"  {len(want)} files, {sum(map(len, want.values())):,} bytes" in text
    assert "left out (hidden): bnb4/.partial-leftover" in text
    assert not re.search(r"^  bnb4/\.partial", text, re.M)
    assert plan.card.rstrip("\n") in text


def test_end_to_end_commit_through_the_real_client(arts, hub_env, capsys, caplog, monkeypatch):
    from quantforge.hub import prepare_publish

    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    monkeypatch.setattr(logging.getLogger("huggingface_hub"), "propagate", True)
    with FakeHub(TOKEN, multipart_chunk=CHUNK) as hub:
        rc = main(cli_args(arts, "--endpoint", hub.url))
        out, err = capsys.readouterr()
        assert rc == 0, err
        assert hub.unexpected == []
        commits = hub.commits(REPO)
        assert [c.summary for c in commits][0] == "initial commit" and len(commits) == 2
        card = prepare_publish(REPO, [str(arts[k]) for k in ("q8", "f16", "bnb", "plan")],
                               results=str(arts["results"])).card
        got = sha256s({p: b for p, b in hub.files(REPO).items() if p != ".gitattributes"})
        assert got == sha256s(expected_contents(arts, card))
        assert hub.files(REPO)["README.md"].decode() == card
        assert commits[1].lfs_paths == {arts["q8"].name, arts["f16"].name, "bnb4/model.safetensors"}
        assert hub.validated == [card]
        api = f"/api/models/{REPO}"
        assert hub.requests[:6] == [f"GET {api}/revision/main", "POST /api/repos/create", f"GET {api}/revision/main",
                                    "POST /api/validate-yaml", f"POST {api}/preupload/main",
                                    f"POST /{REPO}.git/info/lfs/objects/batch"]
        assert hub.requests[-1] == f"POST {api}/commit/main"
        storage = sorted(re.sub(r"/[0-9a-f]{64}", "/OID", r) for r in hub.requests[6:-1])
        n_parts = [-(-arts[k].stat().st_size // CHUNK) for k in ("q8", "f16")]
        assert min(n_parts) >= 2
        assert storage == sorted(["PUT /_storage/OID"] + ["POST /_storage/verify"] * 3
                                 + ["POST /_storage/OID/complete"] * 2
                                 + [f"PUT /_storage/OID/{i}" for n in n_parts for i in range(1, n + 1)])
    assert f"published {len(got)} files to {REPO}@main (new repo)" in out
    assert "Request " in caplog.text  # the client's debug log was captured, and holds no token
    assert TOKEN not in out + err + caplog.text


def test_missing_token_is_a_clear_error_and_sends_nothing(arts, hub_env, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")
    with FakeHub(TOKEN) as hub:
        assert main(cli_args(arts, "--endpoint", hub.url)) == 2
        assert hub.requests == []
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no Hugging Face token" in err and "hf auth login" in err


def test_unreachable_endpoint_is_a_clear_error(arts, hub_env, capsys):
    url = f"http://127.0.0.1:{closed_port()}"
    assert main(cli_args(arts, "--endpoint", url)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot reach the Hub at " + url in err
    assert "nothing was published" in err and TOKEN not in err


def test_rejected_token_is_scrubbed_and_commits_nothing(arts, hub_env, capsys):
    with FakeHub("hf_the_server_expects_another_token") as hub:
        hub.add_repo(REPO)
        assert main(cli_args(arts, "--endpoint", hub.url)) == 2
        assert len(hub.commits(REPO)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "rejected the token (401" in err and TOKEN not in err
    from quantforge.hub import _Scrubber

    echoed = _Scrubber(TOKEN, "http://127.0.0.1").error(f"server said: bad header 'Bearer {TOKEN}'\nmore")
    assert TOKEN not in str(echoed) and "\n" not in str(echoed)


def test_refused_overwrite_then_force(arts, hub_env, capsys):
    with FakeHub(TOKEN, multipart_chunk=CHUNK) as hub:
        hub.add_repo(REPO, {"README.md": b"# hand-written card\n", arts["q8"].name: b"old bytes"})
        assert main(cli_args(arts, "--endpoint", hub.url)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "2 file(s) already exist" in err and "--force" in err
        assert arts["q8"].name in err and "README.md" in err
        assert len(hub.commits(REPO)) == 2 and hub.requests == [f"GET /api/models/{REPO}/revision/main"]
        assert main(cli_args(arts, "--endpoint", hub.url, "--force")) == 0
        assert len(hub.commits(REPO)) == 3 and hub.unexpected == []
        assert hub.files(REPO)[arts["q8"].name] == arts["q8"].read_bytes()


def test_identical_republish_commits_nothing_and_private_is_not_downgraded(arts, hub_env, capsys):
    with FakeHub(TOKEN) as hub:
        assert main(cli_args(arts, "--endpoint", hub.url)) == 0
        assert main(cli_args(arts, "--endpoint", hub.url, "--force")) == 0
        assert "nothing to publish" in capsys.readouterr().out
        assert len(hub.commits(REPO)) == 2 and hub.unexpected == []
        assert main(cli_args(arts, "--endpoint", hub.url, "--force", "--private")) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "is public, but --private was asked" in err
        assert len(hub.commits(REPO)) == 2


def test_branch_moved_during_upload_commits_nothing(arts, hub_env, capsys):
    from helpers.fake_hub import Commit

    def concurrent_push(repo):
        head = repo.head("main")
        repo.branches["main"].append(Commit("f" * 40, "someone else", "", {**head.files, "other.txt": b"x"}))

    with FakeHub(TOKEN) as hub:
        hub.before_commit = concurrent_push
        assert main(cli_args(arts, "--endpoint", hub.url)) == 2
        assert [c.summary for c in hub.commits(REPO)] == ["initial commit", "someone else"]
        assert hub.lfs and arts["q8"].name not in hub.files(REPO)  # blobs were uploaded, never committed
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "branch changed while publishing (412" in err


def test_new_branch_leaves_main_untouched(arts, hub_env):
    with FakeHub(TOKEN) as hub:
        hub.add_repo(REPO, {"NOTES.md": b"# main\n"})
        before = hub.files(REPO)
        assert main(cli_args(arts, "--endpoint", hub.url, "--revision", "v2")) == 0
        assert hub.files(REPO) == before and len(hub.commits(REPO)) == 2
        assert arts["q8"].name in hub.files(REPO, "v2") and "NOTES.md" in hub.files(REPO, "v2")
        assert hub.unexpected == []
        assert f"POST /api/models/{REPO}/branch/v2" in hub.requests


@pytest.mark.parametrize("how", ["gate", "entry"])
def test_failed_regression_gate_is_refused_unless_forced(arts, capsys, how):
    data = json.loads(arts["results"].read_text())
    if how == "gate":
        data["gate"] = {"passed": False, "failures": [{"artifact": str(arts["q8"]), "metric": "kld_mean",
                                                       "baseline": 0.001, "value": 0.00123, "limit": 0.0011}]}
    else:
        data["artifacts"][2]["gate_failed"] = True
    arts["results"].write_text(json.dumps(data))
    assert main(cli_args(arts, "--dry-run")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "regression gate failed" in err and "--force" in err
    assert ("kld_mean" in err) if how == "gate" else ("bnb4" in err)
    assert main(cli_args(arts, "--dry-run", "--force")) == 0
    captured = capsys.readouterr()
    assert "published with `--force` although the regression gate failed" in captured.out
    assert "warning:" in captured.err


def test_base_model_from_metadata_or_required(tmp_path, capsys):
    bare = make_gguf(tmp_path / "bare-Q8_0.gguf", "q8_0", 32, base_url=None, license=None, name="bare")
    assert main(["publish", "--repo", REPO, str(bare), "--dry-run"]) == 2
    assert "pass --base-model" in capsys.readouterr().err
    assert main(["publish", "--repo", REPO, str(bare), "--dry-run", "--base-model", BASE]) == 0
    text = capsys.readouterr().out
    assert f"base_model: {BASE}" in text and "do not state a license" in text
    other = make_gguf(tmp_path / "other-F16.gguf", "f16", 32, base_url="https://huggingface.co/acme/other")
    assert main(["publish", "--repo", REPO, str(other), str(make_gguf(tmp_path / "a-Q8_0.gguf", "q8_0", 32)),
                 "--dry-run"]) == 2
    assert "disagree on base_model" in capsys.readouterr().err


def test_hf16_adapter_and_custom_license(tmp_path):
    import numpy as np
    from huggingface_hub import ModelCard
    from safetensors.numpy import save_file

    from quantforge.hub import prepare_publish

    hf16 = make_folder(tmp_path / "hf16", "hf16")
    plan = prepare_publish(REPO, [str(hf16)], license="Acme Research License 1.0")
    meta = ModelCard(plan.card).data.to_dict()
    assert meta["library_name"] == "transformers" and meta["license"] == "other"
    assert meta["license_name"] == "acme-research-license-1.0"
    header, rows = parse_table(plan.card)
    assert dict(zip(header, rows[0]))["Type"] == "f16" and dict(zip(header, rows[0]))["Bits/weight"] == "16"
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": BASE}))
    save_file({"base_model.model.layers.0.q_proj.lora_A.weight": np.zeros((8, 64), np.float32)},
              str(lora / "adapter_model.safetensors"))
    plan = prepare_publish(REPO, [str(lora)])
    meta = ModelCard(plan.card).data.to_dict()
    assert (meta["base_model"], meta["base_model_relation"], meta["library_name"]) == (BASE, "adapter", "peft")
    assert "AutoPeftModelForCausalLM" in plan.card and "license" not in meta


def test_bad_inputs_are_refused(arts, tmp_path, capsys):
    assert main(["publish", "--repo", "no-org", str(arts["q8"]), "--dry-run"]) == 2
    assert "ORG/NAME" in capsys.readouterr().err
    stale = json.loads(arts["results"].read_text())
    stale["artifacts"][0]["size_bytes"] += 1
    arts["results"].write_text(json.dumps(stale))
    assert main(cli_args(arts, "--dry-run")) == 2
    assert "re-run 'quantforge eval'" in capsys.readouterr().err
    arts["results"].write_text(json.dumps({"schema_version": 2, "artifacts": []}))
    assert main(cli_args(arts, "--dry-run")) == 2
    assert "schema_version 1" in capsys.readouterr().err


def test_publish_modules_import_lean():
    code = ("import sys, quantforge.hub, quantforge.model_card, quantforge.cli.publish_cmd; "
            "heavy = [m for m in ('torch', 'huggingface_hub', 'gguf', 'yaml') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
