"""2:4 checkpoints through bitpress.from_pretrained / save_pretrained: compressed-tensors
"sparse-24-bitmask" (and its FP8 variant), dense checkpoints with a 2:4 pattern, and "marlin-24"
(2:4 + INT4). The checkpoints are written here from the formats' definitions (compressed-tensors'
compressors, transcribed independently of bitpress's readers); compressed-tensors' own
decompression is used in addition when it is importable."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sparse24_data import assert_24, tiny_llama
from torch import nn

import bitpress
from bitpress import Sparse24Int4Linear, Sparse24Linear
from bitpress.sparse24.format_bitmask import from_bitmask, pack_bitmask, unpack_bitmask
from bitpress.sparse24.format_marlin24 import marlin24_permutations, pack_marlin24, unpack_marlin24
from bitpress.sparse24.prune import magnitude_prune

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))
MLP = ("gate_proj", "up_proj", "down_proj")


def _pruned_llama(dtype=torch.float32):
    """The tiny Llama with every MLP Linear magnitude-pruned to 2:4 (dense weights)."""
    model = tiny_llama(seed=1).to(dtype)
    with torch.no_grad():
        for name, m in model.named_modules():
            if name.split(".")[-1] in MLP:
                m.weight.copy_(magnitude_prune(m.weight))
    return model


# bitpress against the dense model: the weights are compared exactly; the logits differ by the
# kernels' summation order only (the sparse GEMM rounds once from a wider accumulator).
LOGIT_TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def _close(a, b, dtype=torch.float32):
    torch.testing.assert_close(a, b, rtol=LOGIT_TOL[dtype], atol=LOGIT_TOL[dtype])


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


def _write(path, model, tensors, qc):
    """config.json (+ quantization_config) and model.safetensors."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    if qc is not None:
        cfg["quantization_config"] = qc
    (path / "config.json").write_text(json.dumps(cfg, default=str))
    safetensors_torch.save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors")
    )


def _plain_state(model, skip=()):
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if not any(k.startswith(s + ".") for s in skip)
    }


# --------------------------------------------------------------------------------------------
# sparse-24-bitmask, from compressed-tensors' definition
# --------------------------------------------------------------------------------------------


def ct_bitmask_compress(w: torch.Tensor):
    """compressed-tensors' sparse24_bitmask_compress, transcribed: the mask keeps the two largest
    |w| of each group of 4 (topk), values are w[mask] row-major, the mask is packed with
    numpy.packbits(axis=-1, bitorder='little'); shape [[N], [K]]."""
    N, K = w.shape
    raw = w.view(torch.int8) if w.dtype == torch.float8_e4m3fn else w
    idx = raw.reshape(-1, 4).abs().topk(2, dim=1).indices
    mask = torch.zeros(raw.reshape(-1, 4).shape, dtype=torch.bool).scatter_(1, idx, True)
    mask = mask.reshape(N, K)
    if w.dtype == torch.float8_e4m3fn:
        values = w.view(torch.int8)[mask].view(torch.float8_e4m3fn)
    else:
        values = w[mask]
    bitmask = torch.from_numpy(np.packbits(mask.numpy(), axis=-1, bitorder="little"))
    return {
        "compressed": values.reshape(N, K // 2),
        "bitmask": bitmask,
        "shape": torch.tensor([N, K]).reshape(-1, 1),
    }


def _bitmask_qc(weights=None, fmt="sparse-24-bitmask"):
    groups = {}
    if weights is not None:
        groups = {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
                "format": "float-quantized",
            }
        }
    return {
        "quant_method": "compressed-tensors",
        "format": "dense" if weights is None else "float-quantized",
        "config_groups": groups,
        "ignore": ["lm_head"],
        "quantization_status": "compressed",
        "sparsity_config": {
            "format": fmt,
            "global_sparsity": 0.3,
            "registry_requires_subclass": False,
            "sparsity_structure": "2:4",
            "targets": ["re:.*mlp.*"],
            "ignore": ["lm_head"],
        },
        "version": "0.12.2",
    }


def test_pack_bitmask_is_numpy_packbits_little():
    mask = torch.rand(5, 24, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_bitmask(mask)
    expect = np.packbits(mask.numpy(), axis=-1, bitorder="little")
    assert packed.dtype == torch.uint8 and np.array_equal(packed.numpy(), expect)
    assert torch.equal(unpack_bitmask(packed, 24), mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_load_sparse_24_bitmask_written_from_the_definition(tmp_path, dtype):
    model = _pruned_llama(dtype)
    mlp = [n for n, _ in model.named_modules() if n.split(".")[-1] in MLP]
    tensors = _plain_state(model, skip=mlp)
    for name in mlp:
        m = model.get_submodule(name)
        for k, v in ct_bitmask_compress(m.weight.detach()).items():
            tensors[f"{name}.{k}"] = v
    _write(tmp_path, model, tensors, _bitmask_qc())
    loaded = bitpress.from_pretrained(tmp_path, dtype=dtype)
    for name in mlp:
        got = loaded.get_submodule(name)
        assert isinstance(got, Sparse24Linear), name
        assert torch.equal(got.dense_weight(), model.get_submodule(name).weight.detach()), name
    assert type(loaded.model.layers[0].self_attn.q_proj) is nn.Linear
    _close(_logits(loaded), _logits(model), dtype)


def test_sparse_24_bitmask_round_trip(tmp_path):
    model = tiny_llama(seed=2)
    bitpress.sparsify_(model, bitpress.Sparse24Config(filter_fn=lambda n, m: "mlp" in n))
    ref = _logits(model)
    bitpress.save_pretrained(model, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["sparsity_config"]["format"] == "sparse-24-bitmask"
    assert qc["sparsity_config"]["sparsity_structure"] == "2:4"
    assert sorted(qc["sparsity_config"]["targets"]) == sorted(
        n for n, m in model.named_modules() if isinstance(m, Sparse24Linear)
    )
    raw = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj"
    assert raw[f"{name}.compressed"].dtype == torch.float32
    assert list(raw[f"{name}.compressed"].shape) == [128, 32]
    assert raw[f"{name}.bitmask"].dtype == torch.uint8
    assert list(raw[f"{name}.bitmask"].shape) == [128, 8]
    assert raw[f"{name}.shape"].tolist() == [[128], [64]]
    bits = unpack_bitmask(raw[f"{name}.bitmask"], 64).reshape(128, 16, 4).sum(-1)
    assert (bits == 2).all()
    loaded = bitpress.from_pretrained(tmp_path, dtype=torch.float32)
    assert isinstance(loaded.get_submodule(name), Sparse24Linear)
    torch.testing.assert_close(_logits(loaded), ref, rtol=0, atol=0)


def _bitmask_checkpoint(tmp_path):
    model = _pruned_llama()
    mlp = [n for n, _ in model.named_modules() if n.split(".")[-1] in MLP]
    tensors = _plain_state(model, skip=mlp)
    for name in mlp:
        for k, v in ct_bitmask_compress(model.get_submodule(name).weight.detach()).items():
            tensors[f"{name}.{k}"] = v
    return model, tensors


@pytest.mark.parametrize(
    "key, change, match",
    [
        ("bitmask", lambda t: t.clone().fill_(0x03), r"bitmask: row 0, group 1 .* 0 bits set"),
        ("bitmask", lambda t: t.clone().fill_(0x37), r"bitmask: row 0, group 0 .* 3 bits set"),
        ("bitmask", lambda t: t[:, :-1], r"bitmask: expected shape \[N, K/8\] = \[128, 8\]"),
        ("compressed", lambda t: t[:, :-2], r"compressed: expected shape \[N, K/2\]"),
        ("compressed", lambda t: t.to(torch.int32), r"compressed: dtype must be"),
        ("shape", lambda t: torch.tensor([[128], [32]]), r"shape: holds \[128, 32\]"),
        ("shape", lambda t: t.unsqueeze(0), r"shape: expected int64 \[2, 1\]"),
        ("shape", lambda t: t.float(), r"shape: expected int64 \[2, 1\]"),
    ],
)
def test_bad_bitmask_tensors_are_named(tmp_path, key, change, match):
    model, tensors = _bitmask_checkpoint(tmp_path)
    name = "model.layers.1.mlp.gate_proj"
    tensors[f"{name}.{key}"] = change(tensors[f"{name}.{key}"])
    _write(tmp_path, model, tensors, _bitmask_qc())
    with pytest.raises(ValueError, match=f"{name}\\.{match}"):
        bitpress.from_pretrained(tmp_path, dtype=torch.float32)


def test_bitmask_missing_tensor_and_unknown_structure(tmp_path):
    model, tensors = _bitmask_checkpoint(tmp_path)
    del tensors["model.layers.0.mlp.down_proj.bitmask"]
    _write(tmp_path / "a", model, tensors, _bitmask_qc())
    with pytest.raises(
        ValueError, match=r"missing tensor 'model\.layers\.0\.mlp\.down_proj\.bitmask'"
    ):
        bitpress.from_pretrained(tmp_path / "a", dtype=torch.float32)
    model, tensors = _bitmask_checkpoint(tmp_path)
    qc = _bitmask_qc()
    qc["sparsity_config"]["sparsity_structure"] = "unstructured"
    _write(tmp_path / "b", model, tensors, qc)
    with pytest.raises(ValueError, match="sparsity_structure"):
        bitpress.from_pretrained(tmp_path / "b", dtype=torch.float32)


def test_from_bitmask_accepts_what_the_writer_picks_for_zero_groups():
    # A group of zeros: compressed-tensors keeps two arbitrary positions (topk of equal values).
    w = torch.zeros(1, 8)
    w[0, 5] = 3.0
    t = ct_bitmask_compress(w)
    values, meta = from_bitmask(t["compressed"], t["bitmask"], t["shape"])
    m = Sparse24Linear.from_interchange(values, meta, None)
    assert torch.equal(m.dense_weight(), w)


def test_load_fp8_sparse_24_bitmask(tmp_path):
    model = _pruned_llama()
    mlp = [n for n, _ in model.named_modules() if n.split(".")[-1] in MLP]
    tensors = _plain_state(model, skip=mlp)
    expect = {}
    for name in mlp:
        w = model.get_submodule(name).weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True) / 448
        q = (w / scale).to(torch.float8_e4m3fn)
        for k, v in ct_bitmask_compress(q).items():
            tensors[f"{name}.{k}"] = v
        tensors[f"{name}.weight_scale"] = scale
        expect[name] = q.float() * scale
    fp8 = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel",
           "dynamic": False}  # fmt: skip
    qc = _bitmask_qc(weights=fp8)
    qc["config_groups"]["group_0"]["targets"] = ["re:.*mlp.*"]  # FP8 2:4 MLPs, dense attention
    _write(tmp_path, model, tensors, qc)
    loaded = bitpress.from_pretrained(tmp_path, dtype=torch.float32)
    for name in mlp:
        got = loaded.get_submodule(name)
        assert isinstance(got, Sparse24Linear)
        assert torch.equal(got.dense_weight(), expect[name]), name


# --------------------------------------------------------------------------------------------
# Dense checkpoints with a 2:4 pattern
# --------------------------------------------------------------------------------------------


def test_dense_24_with_sparsity_config(tmp_path):
    model = _pruned_llama()
    qc = _bitmask_qc(fmt="dense")
    _write(tmp_path, model, _plain_state(model), qc)
    loaded = bitpress.from_pretrained(tmp_path, dtype=torch.float32)
    kinds = {n: type(m).__name__ for n, m in loaded.named_modules() if n.endswith("proj")}
    assert all(v == "Sparse24Linear" for n, v in kinds.items() if ".mlp." in n), kinds
    assert all(v == "Linear" for n, v in kinds.items() if ".mlp." not in n), kinds
    _close(_logits(loaded), _logits(model))


def test_dense_24_flag_without_quantization_config(tmp_path):
    model = tiny_llama(seed=3)
    with torch.no_grad():
        for n, m in model.named_modules():
            if isinstance(m, nn.Linear) and n != "lm_head":
                m.weight.copy_(magnitude_prune(m.weight))
    _write(tmp_path, model, _plain_state(model), None)
    with pytest.raises(ValueError, match="no quantization config"):
        bitpress.from_pretrained(tmp_path, dtype=torch.float32)
    loaded = bitpress.from_pretrained(tmp_path, dtype=torch.float32, sparse24=True)
    for n, m in loaded.named_modules():
        if n.endswith("_proj"):
            assert isinstance(m, Sparse24Linear), n
            assert_24(m.dense_weight())
    assert type(loaded.lm_head) is nn.Linear
    _close(_logits(loaded), _logits(model))


def test_dense_24_pattern_is_checked(tmp_path):
    model = _pruned_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[7, 20:24] = 1.0
    _write(tmp_path, model, _plain_state(model), _bitmask_qc(fmt="dense"))
    with pytest.raises(
        ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight: .*row 7, group 5"
    ):
        bitpress.from_pretrained(tmp_path, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# marlin-24, from compressed-tensors' Marlin24Compressor
# --------------------------------------------------------------------------------------------


def _ct_meta_offsets(m, meta_ncols):
    """compressed-tensors' _calculate_meta_reordering_scatter_offsets (int16 metadata)."""
    dst_rows = torch.arange(0, m)[:, None].repeat(1, meta_ncols)
    dst_cols = torch.arange(0, meta_ncols).repeat(m, 1)
    group_x, group_y = 64, 32
    dst_rows = (
        dst_rows // group_x * group_x
        + (dst_rows % 2) * 2
        + (dst_rows % 8) // 4
        + ((dst_rows % group_y) % 4) // 2 * 32
        + ((dst_rows % group_x) // 8) * 4
    )
    topright = ((dst_rows % 2 == 0) & (dst_cols % 2 == 1)).to(torch.int8)
    bottomleft = ((dst_rows % 2 == 1) & (dst_cols % 2 == 0)).to(torch.int8)
    dst_rows += topright - bottomleft
    dst_cols -= topright - bottomleft
    cols_maj = dst_cols // 2
    cols_min = dst_cols % 2
    return (cols_maj * m * 2 + dst_rows * 2 + cols_min).view(-1)


def _ct_from_dense_cutlass(dense):
    """compressed-tensors' sparse_semi_structured_from_dense_cutlass for float16 input."""
    m, k = dense.shape
    dense_4 = dense.view(-1, k // 4, 4)
    m0, m1, m2, m3 = (dense_4 != 0).unbind(-1)
    meta_ncols = k // 16
    expr0 = m0 & m1
    expr1 = ~m0 & m1
    expr2 = ~m0 & ~m1
    bit0, bit1 = expr1, expr2
    bit2 = expr0 | expr2 | m3
    bit3 = expr1 | ~m1
    idxs0 = bit0 | (bit1.to(torch.int64) << 1)
    idxs1 = bit2 | (bit3.to(torch.int64) << 1)
    sparse0 = dense_4.gather(-1, idxs0.unsqueeze(-1))
    sparse1 = dense_4.gather(-1, idxs1.unsqueeze(-1))
    sparse = torch.stack((sparse0, sparse1), dim=-1).view(m, k // 2)
    meta_4 = idxs0 | (idxs1 << 2)
    meta_n = meta_4.view((-1, meta_ncols, 4)).to(torch.int16)
    meta = (
        meta_n[:, :, 0] | (meta_n[:, :, 1] << 4) | (meta_n[:, :, 2] << 8) | (meta_n[:, :, 3] << 12)
    )
    meta_reordered = meta.new_empty((m * meta_ncols,))
    meta_reordered.scatter_(0, _ct_meta_offsets(m, meta_ncols), meta.view(-1))
    return sparse, meta_reordered.view(m, meta_ncols)


def _ct_permutations():
    perm_list = []
    for i in range(32):
        perm1 = []
        col = i // 4
        col_o = col // 2
        for block in [0, 1]:
            for row in [2 * (i % 4), 2 * (i % 4) + 1, 2 * (i % 4 + 4), 2 * (i % 4 + 4) + 1]:
                perm1.append(16 * row + col_o * 256 + 8 * (col % 2) + 4 * block)
        for j in range(4):
            perm_list.extend([p + 1 * j for p in perm1])
    perm = np.array(perm_list)
    interleave = np.array([0, 2, 4, 6, 1, 3, 5, 7])
    perm = torch.from_numpy(perm.reshape((-1, 8))[:, interleave].ravel())
    scale_perm = []
    for i in range(8):
        scale_perm.extend([i * 8 + j for j in [0, 4, 1, 5, 2, 6, 3, 7]])
    return perm, scale_perm, [8 * i + j for i in range(8) for j in range(8)]


def ct_marlin24_compress(codes, scale, group_size):
    """compressed-tensors' Marlin24Compressor.compress for one layer, transcribed: ``codes``
    [N, K] signed INT4 (−8..7, 2:4), ``scale`` [N, G]; group_size None for channel."""
    value = codes.to(torch.float16).contiguous()
    scale = scale.to(torch.float16)
    value, meta = _ct_from_dense_cutlass(value)
    value = value.t().contiguous()
    scale = scale.t().contiguous()
    size_k, size_n = value.shape
    value += 8
    perm, scale_perm, scale_perm_single = _ct_permutations()
    tile = 16
    q_w = value.reshape((size_k // tile, tile, size_n // tile, tile)).permute((0, 2, 1, 3))
    q_w = q_w.reshape((size_k // tile, size_n * tile))
    q_w = q_w.reshape((-1, perm.numel()))[:, perm].reshape(q_w.shape)
    q_w = q_w.numpy().astype(np.uint32)
    q_packed = np.zeros((q_w.shape[0], q_w.shape[1] // 8), dtype=np.uint32)
    for i in range(8):
        q_packed |= q_w[:, i::8] << 4 * i
    weight_packed = torch.from_numpy(q_packed.astype(np.int32))
    if group_size is not None and group_size < size_k:
        s = scale.reshape((-1, len(scale_perm)))[:, scale_perm]
    else:
        s = scale.reshape((-1, len(scale_perm_single)))[:, scale_perm_single]
    scale_packed = s.reshape((-1, size_n)).contiguous()
    meta = meta.resize_(meta.shape[1] // 2, meta.shape[0] * 2)
    return {"weight_packed": weight_packed, "meta": meta, "scale_packed": scale_packed}


def _quantized_24(N, K, group_size, seed):
    """Signed 2:4 codes [N, K] and scales [N, G] (float16), G = K / group_size or 1."""
    g = torch.Generator().manual_seed(seed)
    w = magnitude_prune(torch.randn(N, K, generator=g))
    gs = K if group_size is None else group_size
    grouped = w.view(N, K // gs, gs)
    scale = (grouped.abs().amax(-1) / 7).clamp_min(1e-3).to(torch.float16)
    codes = torch.clamp(torch.round(grouped / scale.float().unsqueeze(-1)), -8, 7).view(N, K)
    codes[w == 0] = 0
    return codes.to(torch.int64), scale


@pytest.mark.parametrize(
    "N, K, group_size", [(64, 64, None), (128, 256, 128), (64, 512, 128), (64, 128, 32)]
)
def test_unpack_marlin24_matches_the_compressor(N, K, group_size):
    codes, scale = _quantized_24(N, K, group_size, seed=N + K)
    ct = ct_marlin24_compress(codes, scale, group_size)
    assert ct["weight_packed"].shape == (K // 32, 2 * N) and ct["meta"].dtype == torch.int16
    gs = -1 if group_size is None else group_size
    q, meta, s = unpack_marlin24(ct["weight_packed"], ct["meta"], ct["scale_packed"], group_size=gs)
    m = Sparse24Int4Linear.from_interchange(q, meta, s, None, group_size=gs, dtype=torch.float32)
    expect = codes.float() * scale.float().repeat_interleave(K // scale.shape[1], dim=1)
    assert torch.equal(m.dense_weight(), expect)
    # and bitpress writes what the compressor writes, bit for bit
    ours = pack_marlin24(q, meta, s, group_size=gs)
    for k in ct:
        assert torch.equal(ours[k], ct[k]), k


def _marlin_qc(names, group_size):
    strategy = "channel" if group_size is None else "group"
    return {
        "quant_method": "compressed-tensors",
        "format": "marlin-24",
        "config_groups": {
            "group_0": {
                "targets": names,
                "weights": {
                    "num_bits": 4,
                    "type": "int",
                    "symmetric": True,
                    "strategy": strategy,
                    "group_size": group_size,
                    "dynamic": False,
                    "actorder": None,
                },  # fmt: skip
                "input_activations": None,
                "output_activations": None,
                "format": "marlin-24",
            }
        },
        "ignore": ["lm_head"],
        "quantization_status": "compressed",
        "sparsity_config": {
            "format": "dense",
            "sparsity_structure": "2:4",
            "targets": names,
            "ignore": [],
        },  # fmt: skip
    }


@pytest.mark.parametrize("group_size", [32, None])
def test_load_marlin24_checkpoint(tmp_path, group_size):
    model = tiny_llama(seed=4).to(torch.float16)
    names = [n for n, _ in model.named_modules() if n.split(".")[-1] in MLP]
    tensors = _plain_state(model, skip=names)
    with torch.no_grad():
        for i, name in enumerate(names):
            lin = model.get_submodule(name)
            codes, scale = _quantized_24(lin.out_features, lin.in_features, group_size, seed=i)
            for k, v in ct_marlin24_compress(codes, scale, group_size).items():
                tensors[f"{name}.{k}"] = v
            gs = lin.in_features if group_size is None else group_size
            lin.weight.copy_(codes * scale.float().repeat_interleave(gs, dim=1))
    _write(tmp_path, model, tensors, _marlin_qc(names, group_size))
    loaded = bitpress.from_pretrained(tmp_path, dtype=torch.float16)
    for name in names:
        got = loaded.get_submodule(name)
        assert isinstance(got, Sparse24Int4Linear) and got.sym, name
        assert torch.equal(got.dense_weight(), model.get_submodule(name).weight.detach()), name
    _close(_logits(loaded), _logits(model), torch.float16)

    # save_pretrained writes marlin-24 back, the same tensors
    out = tmp_path / "again"
    bitpress.save_pretrained(loaded, out)
    raw = safetensors_torch.load_file(str(out / "model.safetensors"))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert [g["format"] for g in qc["config_groups"].values()] == ["marlin-24"]
    for name in names:
        for k in ("weight_packed", "meta", "scale_packed"):
            assert torch.equal(raw[f"{name}.{k}"], tensors[f"{name}.{k}"]), (name, k)
    again = bitpress.from_pretrained(out, dtype=torch.float16)
    torch.testing.assert_close(_logits(again), _logits(loaded), rtol=0, atol=0)


def test_marlin24_bad_tensors_are_named(tmp_path):
    model = tiny_llama(seed=4).to(torch.float16)
    name = "model.layers.0.mlp.up_proj"
    lin = model.get_submodule(name)
    codes, scale = _quantized_24(lin.out_features, lin.in_features, 32, seed=0)
    good = ct_marlin24_compress(codes, scale, 32)
    for key, bad, match in [
        ("meta", good["meta"].to(torch.int32), r"meta: dtype must be torch.int16"),
        ("weight_packed", good["weight_packed"][:1], r"weight_packed: expected shape \[K/32, 2N\]"),
        ("scale_packed", good["scale_packed"][:, :64], r"scale_packed: expected shape \[G, N\]"),
        ("meta", torch.zeros_like(good["meta"]), r"meta: invalid 2:4 metadata nibble 0x0"),
    ]:
        tensors = _plain_state(model, skip=[name])
        tensors.update({f"{name}.{k}": v for k, v in good.items()})
        tensors[f"{name}.{key}"] = bad
        _write(tmp_path, model, tensors, _marlin_qc([name], 32))
        with pytest.raises(ValueError, match=f"{name}\\.{match}"):
            bitpress.from_pretrained(tmp_path, dtype=torch.float16)
    qc = _marlin_qc([name], 32)
    qc["config_groups"]["group_0"]["weights"]["symmetric"] = False
    tensors = _plain_state(model, skip=[name])
    tensors.update({f"{name}.{k}": v for k, v in good.items()})
    _write(tmp_path, model, tensors, qc)
    with pytest.raises(ValueError, match="weights.symmetric: marlin-24 is symmetric"):
        bitpress.from_pretrained(tmp_path, dtype=torch.float16)


def test_sparsified_quantized_model_round_trip(tmp_path):
    model = tiny_llama(seed=6)
    ids = IDS
    mlp_only = lambda n, m: "mlp" in n  # noqa: E731
    bitpress.sparsify_(
        model, bitpress.Sparse24Config("wanda", calibration=[ids], filter_fn=mlp_only)
    )
    bitpress.quantize_(model, bitpress.Int4Config(group_size=32, filter_fn=lambda n, m: "mlp" in n))
    ref = _logits(model)
    bitpress.save_pretrained(model, tmp_path)
    loaded = bitpress.from_pretrained(tmp_path, dtype=torch.float32)
    assert isinstance(loaded.model.layers[0].mlp.gate_proj, Sparse24Int4Linear)
    torch.testing.assert_close(_logits(loaded), ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# compressed-tensors itself, when installed
# --------------------------------------------------------------------------------------------


def test_compressed_tensors_reads_what_bitpress_writes(tmp_path):
    """compressed-tensors' own helpers on bitpress's tensors: its bitmask unpacking (and, in the
    versions that still ship it, its Sparse24BitMaskTensor decompression), its Marlin-24
    permutations."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.utils import unpack_bitmasks

    model = tiny_llama(seed=7)
    bitpress.sparsify_(model, bitpress.Sparse24Config(filter_fn=lambda n, m: "mlp" in n))
    bitpress.save_pretrained(model, tmp_path)
    raw = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    try:
        from compressed_tensors.compressors.sparse_compressors.sparse_24_bitmask import (
            Sparse24BitMaskTensor,
        )
    except ImportError:  # compressed-tensors >= 0.20 dropped the legacy sparse compressors
        Sparse24BitMaskTensor = None
    for name, m in model.named_modules():
        if not isinstance(m, Sparse24Linear):
            continue
        w = m.dense_weight()
        mask = unpack_bitmasks(raw[f"{name}.bitmask"], list(w.shape))
        dense = torch.zeros_like(w)
        dense[mask] = raw[f"{name}.compressed"].flatten()
        assert torch.equal(dense, w), name
        if Sparse24BitMaskTensor is not None:
            t = Sparse24BitMaskTensor.from_compressed_data(
                shape=raw[f"{name}.shape"],
                compressed=raw[f"{name}.compressed"],
                bitmask=raw[f"{name}.bitmask"],
            )
            assert torch.equal(t.decompress(), w), name
    from compressed_tensors.utils import get_permutations_24

    for theirs, ours in zip(get_permutations_24(4), marlin24_permutations(), strict=True):
        assert torch.equal(torch.as_tensor(theirs).long(), ours.long())
