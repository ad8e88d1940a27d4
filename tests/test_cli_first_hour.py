"""What a new user meets first: outputs that do what was meant, explanations of the bundled model's numbers, a
model card that can be published, a plot that reads well, and hints that name the missing extra."""

from __future__ import annotations

import pytest

from quantforge.cli.main import main


def _run(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


@pytest.mark.parametrize("failure", ["error", "interrupt"])
def test_calibrate_leaves_no_empty_folder(failure, smollm2_dir, tmp_path, capsys, monkeypatch):
    """An error (too little data) or an interrupt after the output folder was made leaves no folder behind."""
    data = tmp_path / "tiny.txt"
    data.write_text("hi\n")
    if failure == "interrupt":
        import quantforge.calibration.data as calibration_data

        def interrupted(*_a, **_k):
            raise KeyboardInterrupt

        monkeypatch.setattr(calibration_data, "load_chunks", interrupted)
    out = tmp_path / "cal"
    code, _, err = _run(capsys, "calibrate", str(smollm2_dir), "--data", str(data), "-o", str(out), "--tokens", "512",
                        "--ctx", "128")
    assert code == (2 if failure == "error" else 130), err
    assert len(err.splitlines()) == 1
    assert not out.exists()


def test_inspect_explains_smollm2_q4_k_m_bits_per_weight(smollm2_dir, tmp_path, capsys):
    out = tmp_path / "smollm2-q4_k_m.gguf"
    assert main(["quantize", str(smollm2_dir), "--type", "q4_k_m", "-o", str(out), "--quiet"]) == 0
    capsys.readouterr()
    code, stdout, _ = _run(capsys, "inspect", str(out))
    assert code == 0
    assert "6.17" in stdout and "576" in stdout and "256-weight K-quant block" in stdout and "q5_0" in stdout
    from quantforge.inspect import describe, mix_label

    assert mix_label(describe(out)) == "q4_k_m"


def test_planned_mix_is_labelled_dyn(smollm2_dir, tmp_path):
    """A plan at q4_k_m's size that changes one tensor's type is a ``q4_k_m-dyn`` file, not ``q4_k_m``."""
    from quantforge.inspect import describe, mix_label

    plan = tmp_path / "plan.yaml"
    plan.write_text("version: 1\ntarget: gguf\nbase_type: q4_k_m\ntensors:\n  blk.0.ffn_down.weight: q8_0\n")
    out = tmp_path / "smollm2-q4_k_m-dyn.gguf"
    assert main(["quantize", str(smollm2_dir), "--plan", str(plan), "-o", str(out), "--quiet"]) == 0
    assert mix_label(describe(out)) == "q4_k_m-dyn"


def _artifact(name, kind="gguf", typ="q4_k_m", size=1000):
    from pathlib import Path

    from quantforge.model_card import Artifact

    return Artifact(local=Path("/x") / name, kind=kind, name=name, files=[(name, Path("/x") / name)],
                    size_bytes=size, bpw=4.9, type=typ)


def test_ollama_tags_are_unique():
    from quantforge.model_card import ollama_tags

    arts = [_artifact("m-q4_k_m.gguf"), _artifact("m-q4_k_m-dyn.gguf", typ="q4_k_m-dyn"),
            _artifact("m-q8_0.gguf", typ="q8_0")]
    tags = ollama_tags(arts)
    assert tags == {"m-q4_k_m.gguf": None, "m-q4_k_m-dyn.gguf": "Q4_K_M-DYN", "m-q8_0.gguf": "Q8_0"}


def test_card_states_sample_sizes_and_errors_and_no_local_paths():
    from quantforge.model_card import CardInfo, Results, SideFile, render_card

    metrics = {"kld_mean": 0.05, "kld_err": 0.002, "kld_p99": 0.4, "ppl": 25.8, "ppl_err": 0.9, "top1": 0.85,
               "top1_err": 0.008, "arc_easy_acc": 0.5, "arc_easy_acc_stderr": 0.07, "n_tokens": 2040}
    data = {"schema_version": 1, "settings": {"n_ctx": 512, "n_chunks": 8, "text": "/root/data/wiki.test.raw",
                                              "text_name": "wiki.test.raw", "limit": 50},
            "tasks": {"arc_easy": {"n_samples": 50}},
            "reference": {"name": "smollm2", "path": "/root/.cache/quantforge/smollm2", "metrics": metrics},
            "artifacts": [{"name": "m-q4_k_m.gguf", "path": "/x/m-q4_k_m.gguf", "metrics": metrics}]}
    from pathlib import Path

    results = Results(SideFile(Path("/x/results.json"), "results", data), data["artifacts"], None)
    plan = SideFile(Path("/x/plan.yaml"), "plan", {"version": 1, "target": "gguf", "model": "/root/.cache/q/m",
                                                    "calibration": {"folder": "/root/cal", "model_hash": "ab12"}})
    info = CardInfo(repo_id="org/m", revision="main", base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
                    relation="quantized", license="apache-2.0", license_name=None, license_link=None,
                    artifacts=[_artifact("m-q4_k_m.gguf")], plans=[plan], results=results)
    card = render_card(info)
    assert "/root" not in card
    assert "8 chunks of 512 tokens" in card and "2040 scored tokens" in card and "arc_easy 50 documents" in card
    assert "0.05 ± 0.002" in card and "0.5 ± 0.07" in card and "standard errors" in card


def test_plot_shows_plain_mib_and_spreads_crowded_labels(tmp_path):
    """Sizes near 100 MiB get plain tick labels (no ``1e2`` offset), and five points within 0.2 MiB get labels
    whose boxes do not overlap."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from quantforge.evals import report

    fig = Figure(figsize=(5, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    pts = [(100.0 + 0.05 * i, 0.05 * (1 + 0.01 * i), f"smollm2-variant-{i}.gguf") for i in range(5)]
    ax.scatter([p[0] for p in pts], [p[1] for p in pts])
    ax.set_yscale("log")
    fig.canvas.draw()
    report._label_points(ax, pts)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert len(boxes) == 5
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (a, b)

    rows = [{"name": n, "size_bytes": int(x * 2**20), "metrics": {"kld_mean": y, "ppl": 25 + y}} for x, y, n in pts]
    results = {"reference": {"name": "ref", "size_bytes": 256 * 2**20, "metrics": {"kld_mean": 0.0, "ppl": 24.5}},
               "artifacts": rows}
    full = report.figure(results)
    for axis in full.axes:
        assert axis.xaxis.get_offset_text().get_text() == ""
        labels = [t.get_text() for t in axis.get_xticklabels() if t.get_text()]
        assert labels and all("e" not in t for t in labels) and any(t.startswith("1") for t in labels)
    path = tmp_path / "r.png"
    report.plot(results, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_extra_names_it(smollm2_dir, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    text = tmp_path / "t.txt"
    text.write_text("hello\n")
    code, _, err = _run(capsys, "eval", str(smollm2_dir), "--reference", str(smollm2_dir), "--tasks", "arc_easy",
                        "--text", str(text), "-o", str(tmp_path / "r.json"))
    assert code == 2 and len(err.splitlines()) == 1
    assert "pip install 'quantforge[eval]'" in err and "lm-eval" in err


def test_train_without_datasets_names_the_extra(smollm2_dir, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real(name, *a))
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    code, _, err = _run(capsys, "train", str(smollm2_dir), "--data", str(data), "-o", str(tmp_path / "a"),
                        "--device", "cpu")
    assert code == 2 and len(err.splitlines()) == 1
    assert "pip install 'quantforge[train]'" in err and "datasets" in err
    assert not (tmp_path / "a").exists()


def test_fixture_help_explains_the_grid(capsys):
    with pytest.raises(SystemExit):
        main(["fixture", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Q4_1" in text and "dithered" in text and "artificially easy" in text


def test_quantize_help_states_the_default_type(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: f16" in text and "gguf only" in text


def test_single_shard_folder_has_no_index(smollm2_dir, tmp_path, capsys):
    """One shard: ``model.safetensors`` and no ``model.safetensors.index.json`` (as transformers writes it)."""
    out = tmp_path / "hf16"
    code, _, err = _run(capsys, "quantize", str(smollm2_dir), "--format", "hf16", "-o", str(out))
    assert code == 0, err
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
