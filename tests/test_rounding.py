"""Error-feedback rounding inside the GGUF block structure: code packing per type, the output error it reaches
against the types' default (llama.cpp) rounding, determinism, and the input second-moment accumulation."""

from __future__ import annotations

import pytest
import torch
from helpers.rounding import correlated_layer

from quantforge.formats import get_format
from quantforge.rounding.gptq import DAMP, GptqRounder, gptq_rows, inverse_factor, refit_super_scales
from quantforge.rounding.grids import SUPPORTED, affine, grid_for, with_codes


@pytest.mark.parametrize("name", SUPPORTED)
def test_codes_written_back_reproduce_the_blocks(name):
    """Reading every weight's (s, o) through the type's dequantizer and writing the codes of its decoded values
    back gives the codec's bytes exactly: the packer and the code values agree with the format."""
    fmt = get_format(name)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, fmt.block_size, generator=g) * torch.exp(torch.randn(fmt.block_size, generator=g))
    blocks = fmt.quantize(w, None)
    s, o = affine(grid_for(name), blocks)
    assert bool((s != 0).all())
    values = grid_for(name).values_tensor(w.device)
    t = (fmt.dequantize(blocks) - o) / s
    codes = (t[..., None] - values).abs().argmin(dim=-1)
    assert float((t - values[codes]).abs().max()) < 1e-3
    if grid_for(name).flat:  # the 32-weight types read (s, o) from the fields: exact values
        assert torch.equal(s * values[codes] + o, fmt.dequantize(blocks))
    assert torch.equal(with_codes(grid_for(name), blocks, codes), blocks)


# Output error of gptq / default rounding on this layer (n = 512, 16 rows, 512 tokens), measured: 0.52-0.76
# (q8_0 0.52, q2_k 0.76); the bound leaves a small margin for BLAS differences across machines.
RATIO_BOUND = 0.82


@pytest.mark.parametrize("name", SUPPORTED)
def test_gptq_output_error_is_below_default_rounding(name):
    fmt = get_format(name)
    w, x = correlated_layer(512)
    h = x.t() @ x / x.shape[0]
    imatrix = (x * x).mean(dim=0)
    default = fmt.dequantize(fmt.quantize(w, imatrix if fmt.takes_imatrix else None))
    ours = fmt.dequantize(GptqRounder(fmt, lambda: h, "g")(w, imatrix))
    e_default = float((x @ (w - default).t()).norm())
    e_ours = float((x @ (w - ours).t()).norm())
    assert e_ours < RATIO_BOUND * e_default, (e_ours, e_default)


@pytest.mark.parametrize("name", ["q4_k", "q5_0"])
def test_gptq_is_deterministic(name):
    """Two runs give the same bytes."""
    fmt = get_format(name)
    w, x = correlated_layer(256, rows=12, seed=3)
    factor = inverse_factor(x.t() @ x / x.shape[0])
    imatrix = (x * x).mean(dim=0)
    a = gptq_rows(w, fmt, factor, imatrix)
    assert torch.equal(a, gptq_rows(w, fmt, factor, imatrix))


@pytest.mark.parametrize("name", ["q2_k", "q4_k", "q6_k", "q4_1", "q8_0"])
def test_refit_never_raises_the_weighted_error(name):
    fmt = get_format(name)
    g = torch.Generator().manual_seed(5)
    target = torch.randn(32, fmt.block_size, generator=g)
    qw = torch.rand(fmt.block_size, generator=g) + 0.1
    blocks = fmt.quantize(target + 0.05 * torch.randn(target.shape, generator=g), None)
    fitted = refit_super_scales(grid_for(name), blocks, target, qw)

    def err(b):
        return ((fmt.dequantize(b) - target) ** 2 * qw).sum(dim=1)

    assert bool((err(fitted) <= err(blocks)).all())
    assert bool((err(fitted) < err(blocks)).any())


def test_inverse_factor_inverts_the_damped_matrix_and_keeps_dead_columns():
    _, x = correlated_layer(64, tokens=256, seed=7)
    x[:, 3] = 0.0
    h = (x.t() @ x / x.shape[0]).double()
    u = inverse_factor(h).double()
    damped = h.clone()
    damped[3, 3] = 1.0
    damped += DAMP * torch.diagonal(damped).mean() * torch.eye(64, dtype=torch.float64)
    assert torch.allclose(u.t() @ u @ damped, torch.eye(64, dtype=torch.float64), atol=1e-4)
    assert bool((torch.triu(u) == u).all())


def test_unsupported_type_is_refused():
    from quantforge.errors import UnsupportedFormat

    with pytest.raises(UnsupportedFormat, match="iq2_xxs"):
        grid_for("iq2_xxs")


def test_hessian_accumulator_groups_shared_inputs():
    """Weights fed the same tensor one after another share a matrix, equal to XᵀX / tokens over all calls."""
    from quantforge.calibration.hessian_pass import HessianAccumulator

    acc = HessianAccumulator({k: k for k in ("q", "k", "v", "o")})
    g = torch.Generator().manual_seed(0)
    xs, outs = [], []
    for _ in range(3):
        x = torch.randn(2, 20, 8, generator=g)
        xo = torch.randn(2, 20, 8, generator=g)
        for name in ("q", "k", "v"):
            acc.add(name, x.detach())
        acc.add("o", xo.detach())
        xs.append(x.reshape(-1, 8))
        outs.append(xo.reshape(-1, 8))
    from quantforge.rounding.hessians import unpack_upper

    packed, members, tokens = acc.result()
    groups = {k: unpack_upper(v) for k, v in packed.items()}
    assert members == {"q": "q", "k": "q", "v": "q", "o": "o"}
    assert tokens == {"q": 120, "o": 120}
    x_in, x_out = torch.cat(xs).double(), torch.cat(outs).double()
    assert torch.allclose(groups["q"].double(), x_in.t() @ x_in / 120, rtol=1e-5, atol=1e-6)
    assert torch.allclose(groups["o"].double(), x_out.t() @ x_out / 120, rtol=1e-5, atol=1e-6)


def test_hessian_file_stores_upper_triangles_and_reads_full_matrices(tmp_path):
    """The file keeps n (n + 1) / 2 values per group and gives back the symmetric matrix; files that stored full
    matrices (version 1) read the same."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from quantforge.rounding.hessians import Hessians, save_hessians

    _, x = correlated_layer(40, tokens=100, seed=2)
    h = x.t() @ x / x.shape[0]
    h = torch.triu(h) + torch.triu(h, 1).t()  # exactly symmetric, as the upper triangle stands for
    path = save_hessians(tmp_path / "h.safetensors", {"a": h}, {"a": "a", "b": "a"}, {"a": 100}, "k")
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("a").shape == (40 * 41 // 2,)
    store = Hessians(path)
    assert torch.equal(store.for_tensor("b"), h) and store.key == "k"
    save_file({"a": h}, str(tmp_path / "v1.safetensors"),
              metadata={"format": "quantforge-hessians", "version": "1", "key": "k",
                        "members": json.dumps({"a": "a"}), "tokens": json.dumps({"a": 100})})
    assert torch.equal(Hessians(tmp_path / "v1.safetensors").for_tensor("a"), h)


def test_hessian_file_is_streamed_group_by_group(tmp_path):
    """The streaming writer's file is a valid safetensors file (every byte indexed, header padded with spaces)
    holding what was written: packed float32 ``H``, float16 corrections and the metadata, byte-identical when
    written again; the header room reserved from the names holds names JSON escapes at length."""
    import json
    import struct

    from safetensors import safe_open

    from quantforge.errors import InternalError
    from quantforge.rounding.hessians import CORRECTION, Hessians, hessian_writer, pack_upper

    names = ["blk.0.attn_q.weight", 'blk.0.\u00e9"\U0001f600.weight', "blk.0.ffn_down.weight"]
    g = torch.Generator().manual_seed(3)
    mats = {}
    for name, n in zip(names, (16, 8, 24), strict=True):
        x = torch.randn(64, n, generator=g)
        h = x.t() @ x / 64
        mats[name] = (torch.triu(h) + torch.triu(h, 1).t(), torch.randn(n, n, generator=g))
    members = {**{n: n for n in names}, "blk.0.attn_k.weight": names[0]}
    tokens = {n: 64 for n in names}

    def write(path):
        with hessian_writer(path, [*names, "blk.0.attn_k.weight"]) as w:
            for name in names:  # the order calibration finishes groups in, not sorted
                w.add_group(name, *mats[name])
            w.finish(members, tokens, "key", types={"blk.0.attn_q.weight": "q4_k"}, mode="gptq")
        return path

    a, b = write(tmp_path / "a.safetensors"), write(tmp_path / "b.safetensors")
    assert a.read_bytes() == b.read_bytes()
    raw = a.read_bytes()
    n_header = struct.unpack("<Q", raw[:8])[0]
    header = raw[8:8 + n_header].decode()
    assert header.endswith(" ") and json.loads(header)["__metadata__"]
    store = Hessians(a)
    assert store.key == "key" and store.members == members and store.types == {"blk.0.attn_q.weight": "q4_k"}
    with safe_open(str(a), framework="pt") as f:
        for name in names:
            h, d = mats[name]
            assert torch.equal(f.get_tensor(name), pack_upper(h))
            assert torch.equal(f.get_tensor(CORRECTION + name), d.half())
    assert torch.equal(store.for_tensor("blk.0.attn_k.weight"), mats[names[0]][0])
    assert torch.equal(store.correction_for(names[1]), mats[names[1]][1].half().float())
    with pytest.raises(InternalError), hessian_writer(tmp_path / "c.safetensors", names) as w:
        w.add_group(names[0], mats[names[0]][0])
    assert not list(tmp_path.glob("*c.safetensors*"))
    long = '"\\' * 100 + "\U0001f600" * 100  # escapes to the most bytes, shared by many short names
    short = [str(i) for i in range(200)]
    with hessian_writer(tmp_path / "d.safetensors", [long, *short]) as w:
        w.add_group(long, mats[names[0]][0], mats[names[0]][1])
        w.finish({n: long for n in [long, *short]}, {long: 64}, "key", types={n: "q4_k" for n in short}, mode="gptq")
    assert Hessians(tmp_path / "d.safetensors").members[short[-1]] == long


def test_hessian_pass_hands_each_layer_to_the_writer():
    """With a sink, the accumulator keeps nothing once a group is finished: the file writer gets each ``H``."""
    from quantforge.calibration.hessian_pass import HessianAccumulator

    got = {}
    acc = HessianAccumulator({"q": "q", "o": "o"}, sink=lambda g, h: got.__setitem__(g, h))
    x = torch.randn(2, 5, 4)
    acc.add("q", x)
    acc.add("o", x + 1)
    acc.finish()
    assert sorted(got) == ["o", "q"] and not acc.done and not acc.sums
    assert acc.result()[1:] == ({"q": "q", "o": "o"}, {"q": 10, "o": 10})


@pytest.mark.parametrize("name", ["q4_k", "q4_0"])
def test_scale_search_and_hessian_weighting_also_lower_the_error(name):
    """The optional modes (super-scale multiples chosen under error feedback, 1 / U_jj² weighting) write valid
    blocks whose output error is below the default rounding's too."""
    fmt = get_format(name)
    w, x = correlated_layer(512)
    factor = inverse_factor(x.t() @ x / x.shape[0])
    imatrix = (x * x).mean(dim=0)
    default = fmt.dequantize(fmt.quantize(w, imatrix))
    ours = fmt.dequantize(gptq_rows(w, fmt, factor, None, scales=(0.9, 1.0, 1.1), weighting="hessian"))
    assert float((x @ (w - ours).t()).norm()) < RATIO_BOUND * float((x @ (w - default).t()).norm())
