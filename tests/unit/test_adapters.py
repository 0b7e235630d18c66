"""LoRA style adapters: identity at creation, exact switching, PEFT files, verified loading."""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors import safe_open

from histosynth.synthesis.adapters import (
    CONFIG_FILE,
    CROSS_ATTENTION_TARGETS,
    METADATA_FILE,
    WEIGHTS_FILE,
    AdapterInfo,
    activate,
    active_adapter,
    base_weight_hash,
    check_adapter,
    create_adapter,
    fuse,
    fused_adapter,
    list_adapters,
    load_adapter,
    loaded_adapters,
    model_resolution,
    read_adapter_info,
    save_adapter,
    unfuse,
    unload_adapter,
)
from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.models import PixCellTransformer2DModel, enable_kv_compression

# PixCell-1024's structure (ada_norm_single PixArt, 16 → 32 channels, UNI rows on a grid),
# shrunk: 2 blocks, hidden 2 × 32, UNI width 32, 2 × 2 rows, 16 × 16 latents (128 px tiles).
TINY = {
    "num_layers": 2,
    "num_attention_heads": 2,
    "attention_head_dim": 32,
    "cross_attention_dim": 64,
    "caption_channels": 32,
    "caption_num_tokens": 4,
    "sample_size": 16,
    "in_channels": 16,
    "out_channels": 32,
    "interpolation_scale": 2,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "attention_bias": True,
    "activation_fn": "gelu-approximate",
    "use_additional_conditions": False,
}


def make_tiny(seed: int = 0, **overrides: object) -> PixCellTransformer2DModel:
    torch.manual_seed(seed)
    return PixCellTransformer2DModel.from_config({**TINY, **overrides}).eval()


def inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(batch, 16, 16, 16, generator=g)
    rows = torch.randn(batch, 4, 32, generator=g)
    return latents, rows, torch.tensor([10, 700])[:batch]


@torch.no_grad()
def run(model: torch.nn.Module) -> torch.Tensor:
    return model(*inputs()).sample


def lora_params(model: torch.nn.Module, name: str, which: str = "lora_B"):
    return [p for key, p in model.named_parameters() if f".{which}.{name}." in key]


@torch.no_grad()
def perturb(model: torch.nn.Module, name: str, seed: int) -> None:
    """Stand-in for training: give adapter ``name`` a non-zero B."""
    g = torch.Generator().manual_seed(seed)
    for p in lora_params(model, name):
        p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def trained_adapter(model: torch.nn.Module, name: str, seed: int, **kwargs) -> AdapterInfo:
    info = create_adapter(model, name, base_id="tiny-seed0", **kwargs)
    perturb(model, name, seed)
    return info


def test_fresh_adapter_changes_nothing_and_trains_only_cross_attention_lora() -> None:
    model = make_tiny()
    before_hash = base_weight_hash(model)
    base = run(model)
    info = create_adapter(model, "style", domain="TCGA-BRCA", base_id="tiny")

    assert active_adapter(model) == "style"
    b_weights, a_weights = lora_params(model, "style"), lora_params(model, "style", "lora_A")
    assert len(b_weights) == len(a_weights) == 2 * len(CROSS_ATTENTION_TARGETS)
    assert all(torch.count_nonzero(b) == 0 for b in b_weights)  # B = 0 ...
    assert all(a.std() > 0.05 for a in a_weights)  # ... A gaussian
    assert torch.equal(run(model), base)  # so the adapter starts as the identity

    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".attn2." in k and ".lora_" in k for k in trainable)
    assert not any(".attn1." in k for k in model.state_dict() if "lora_" in k)

    assert info.name == "style" and info.domain == "TCGA-BRCA" and info.base_id == "tiny"
    assert (info.rank, info.alpha, info.resolution) == (4, 4, 128)
    assert model_resolution(model) == 128  # sample_size 16 latents × 8
    assert info.target_modules == list(CROSS_ATTENTION_TARGETS)
    assert info.base_hash == before_hash == base_weight_hash(model)  # LoRA is not "base"
    created = datetime.fromisoformat(info.created)
    assert created.utcoffset().total_seconds() == 0
    assert loaded_adapters(model) == {"style": info}


def test_base_hash_identifies_the_weights_not_their_precision_or_speed_options() -> None:
    model = make_tiny()
    digest = base_weight_hash(model)
    assert len(digest) == 64 and digest == base_weight_hash(make_tiny())
    assert base_weight_hash(copy.deepcopy(model).to(torch.bfloat16)) == digest
    assert base_weight_hash(make_tiny(seed=1)) != digest

    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.transformer_blocks[1].ff.net[2].weight[0, 0] += 0.01
    assert base_weight_hash(changed) != digest
    nulled = copy.deepcopy(model)  # persistent buffers count: the learned null condition
    with torch.no_grad():
        nulled.caption_projection.uncond_embedding[0, 0] += 0.01
    assert base_weight_hash(nulled) != digest

    compressed = copy.deepcopy(model)
    enable_kv_compression(compressed, ratio=2, blocks=[1])
    assert any(".processor." in k for k in compressed.state_dict())
    assert base_weight_hash(compressed) == digest


def test_perturbed_adapter_changes_output_and_switching_restores_exactly() -> None:
    model = make_tiny()
    base = run(model)
    trained_adapter(model, "he", seed=10)
    styled = run(model)
    assert (styled - base).abs().max() > 1e-3

    activate(model, None)
    assert active_adapter(model) is None
    assert torch.equal(run(model), base)
    activate(model, "he")
    assert torch.equal(run(model), styled)

    trained_adapter(model, "ihc", seed=11)  # a second one, loaded alongside
    other = run(model)
    assert active_adapter(model) == "ihc"
    assert (other - styled).abs().max() > 1e-3
    for name, expected in [("he", styled), (None, base), ("ihc", other), ("he", styled)]:
        activate(model, name)
        assert torch.equal(run(model), expected), name

    with pytest.raises(EngineError, match=r"no adapter 'nope' is loaded \(loaded: \['he', 'ihc'"):
        activate(model, "nope")
    activate(model, "ihc")
    unload_adapter(model, "ihc")  # the active one: the plain base is left
    assert list(loaded_adapters(model)) == ["he"] and active_adapter(model) is None
    assert torch.equal(run(model), base)
    activate(model, "he")
    assert torch.equal(run(model), styled)
    trained_adapter(model, "spare", seed=12)
    activate(model, "he")
    unload_adapter(model, "spare")  # not the active one: "he" stays
    assert active_adapter(model) == "he" and torch.equal(run(model), styled)
    unload_adapter(model, "he")
    assert loaded_adapters(model) == {} and active_adapter(model) is None
    assert not any("lora_" in k or "base_layer" in k for k in model.state_dict())
    assert torch.equal(run(model), base)
    activate(model, None)  # fine with no adapters at all


def test_save_writes_peft_files_and_load_reproduces_the_adapter(tmp_path: Path) -> None:
    model = make_tiny()
    trained_adapter(model, "he", seed=10, training_data_checksum="sha256:abc")
    styled = run(model)
    info = save_adapter(model, "he", tmp_path / "lib" / "he")
    folder = tmp_path / "lib" / "he"

    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [WEIGHTS_FILE, CONFIG_FILE, METADATA_FILE]
    )
    assert [p.name for p in (tmp_path / "lib").iterdir()] == ["he"]  # no temp folder left
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 4
    assert sorted(config["target_modules"]) == sorted(CROSS_ATTENTION_TARGETS)
    with safe_open(str(folder / WEIGHTS_FILE), "pt") as f:
        keys = sorted(f.keys())
        to_k = f.get_tensor("base_model.model.transformer_blocks.0.attn2.to_k.lora_A.weight")
    assert to_k.shape == (4, 64)  # [r, cross_attention_dim]
    assert len(keys) == 16  # 2 blocks × 4 targets × (A, B), PEFT's key names
    assert all(k.startswith("base_model.model.transformer_blocks.") for k in keys)
    meta = json.loads((folder / METADATA_FILE).read_text())
    assert meta["format"] == 1 and meta["name"] == "he" and meta["base_id"] == "tiny-seed0"
    assert meta["base_hash"] == base_weight_hash(make_tiny())
    assert meta["training_data_checksum"] == "sha256:abc" and meta["resolution"] == 128
    assert meta["histosynth_version"] and len(meta["weights_sha256"]) == 64
    assert read_adapter_info(folder) == info and info.folder == folder

    fresh = make_tiny()  # a separate copy of the same base
    base = run(fresh)
    loaded = load_adapter(fresh, folder)
    assert loaded == info and active_adapter(fresh) == "he"
    assert torch.equal(run(fresh), styled)
    activate(fresh, None)
    assert torch.equal(run(fresh), base)

    # PEFT's own loader reads the folder as one of its own
    peft_model = PeftModel.from_pretrained(make_tiny(), str(folder), adapter_name="he")
    assert torch.equal(run(peft_model), styled)

    with pytest.raises(EngineError, match="already exists; pass overwrite=True"):
        save_adapter(model, "he", folder)
    info2 = save_adapter(model, "he", folder, info=loaded_adapters(model)["he"], overwrite=True)
    assert info2.weights_sha256 == info.weights_sha256
    assert [p.name for p in (tmp_path / "lib").iterdir()] == ["he"]


def test_library_lists_several_and_loads_them_side_by_side(tmp_path: Path) -> None:
    model = make_tiny()
    base = run(model)
    outputs = {}
    for name, seed in [("ihc", 11), ("he", 10)]:
        trained_adapter(model, name, seed=seed, domain=f"{name}-set")
        outputs[name] = run(model)
        save_adapter(model, name, tmp_path / name)
    (tmp_path / ".he.tmp-0000").mkdir()  # an interrupted write: ignored
    listed = list_adapters(tmp_path)
    assert [i.name for i in listed] == ["he", "ihc"]
    assert [i.domain for i in listed] == ["he-set", "ihc-set"]
    assert list_adapters(tmp_path / "missing") == []

    fresh = make_tiny()
    load_adapter(fresh, tmp_path / "he")
    load_adapter(fresh, tmp_path / "ihc", activate=False)  # "he" stays active
    assert active_adapter(fresh) == "he" and list(loaded_adapters(fresh)) == ["he", "ihc"]
    assert torch.equal(run(fresh), outputs["he"])
    activate(fresh, "ihc")
    assert torch.equal(run(fresh), outputs["ihc"])
    activate(fresh, None)
    load_adapter(fresh, tmp_path / "he", name="he-copy", activate=False)
    assert active_adapter(fresh) is None and torch.equal(run(fresh), base)
    activate(fresh, "he-copy")
    assert torch.equal(run(fresh), outputs["he"])
    with pytest.raises(EngineError, match="an adapter named 'ihc' is already loaded"):
        load_adapter(fresh, tmp_path / "ihc")

    (tmp_path / "stray").mkdir()
    with pytest.raises(EngineError, match=rf"{tmp_path / 'stray' / METADATA_FILE}: missing"):
        list_adapters(tmp_path)


def test_fuse_matches_the_adapter_and_unfuse_restores_the_base_bit_for_bit() -> None:
    model = make_tiny()
    base = run(model)
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    digest = base_weight_hash(model)
    trained_adapter(model, "he", seed=10)
    trained_adapter(model, "ihc", seed=11)
    activate(model, "he")
    styled = run(model)

    fuse(model)
    assert fused_adapter(model) == "he"
    assert (run(model) - styled).abs().max() <= 1e-5
    with pytest.raises(EngineError, match="'he' is fused into the base weights"):
        base_weight_hash(model)

    unfuse(model)
    assert fused_adapter(model) is None and active_adapter(model) == "he"
    for key, value in model.state_dict().items():
        if "lora_" not in key:
            assert torch.equal(value, originals[key.replace("base_layer.", "")]), key
    assert base_weight_hash(model) == digest
    assert torch.equal(run(model), styled)

    fuse(model, "ihc")
    activate(model, None)  # switching away unfuses first, exactly
    assert fused_adapter(model) is None
    assert torch.equal(run(model), base)


# ----------------------------------------------------------------------------- bad input


@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    model = make_tiny()
    trained_adapter(model, "he", seed=10)
    return save_adapter(model, "he", tmp_path / "he").folder


def untouched(model: torch.nn.Module) -> bool:
    return not getattr(model, "peft_config", None) and not loaded_adapters(model)


def test_adapter_for_another_base_is_refused_naming_both(saved: Path) -> None:
    other = make_tiny(seed=1)
    expected = base_weight_hash(make_tiny())[:16]
    found = base_weight_hash(other)[:16]
    with pytest.raises(EngineError) as err:
        load_adapter(other, saved, base_id="pixcell-256")
    message = str(err.value)
    assert message.startswith(f"{saved}: base weights: made for base 'tiny-seed0'")
    assert f"weight hash {expected}" in message and f"'pixcell-256' has {found}" in message
    assert untouched(other)
    with pytest.raises(EngineError, match="base weights"):
        check_adapter(other, saved)


def test_adapter_for_another_resolution_is_refused(saved: Path) -> None:
    model = make_tiny(sample_size=32)
    with pytest.raises(
        EngineError,
        match=rf"^{saved}: resolution: made for 128 px tiles, the loaded base works at 256 px$",
    ):
        load_adapter(model, saved)
    assert untouched(model)


def test_corrupted_weights_are_refused_naming_the_file(saved: Path) -> None:
    weights = saved / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit pattern in the tensor data: still parseable
    weights.write_bytes(bytes(data))
    model = make_tiny()
    with pytest.raises(
        EngineError, match=rf"^{weights}: checksum mismatch: expected sha256 [0-9a-f]{{16}}"
    ):
        load_adapter(model, saved)
    weights.write_bytes(bytes(data[: len(data) // 2]))  # truncated: the checksum comes first
    with pytest.raises(EngineError, match=rf"^{weights}: checksum mismatch"):
        load_adapter(model, saved)
    # a file the metadata vouches for (its sha256 recorded) that is not safetensors
    meta = saved / METADATA_FILE
    for garbage in (bytes(data[: len(data) // 2]), b"\x00garbage"):
        weights.write_bytes(garbage)
        info = json.loads(meta.read_text())
        meta.write_text(json.dumps({**info, "weights_sha256": hashlib.sha256(garbage).hexdigest()}))
        with pytest.raises(EngineError, match=rf"^{weights}: not a readable safetensors file"):
            load_adapter(model, saved)
    assert untouched(model)


def test_missing_or_broken_metadata_is_refused(saved: Path) -> None:
    model = make_tiny()
    meta = saved / METADATA_FILE
    text = meta.read_text()
    meta.write_text(text[:-20])
    with pytest.raises(EngineError, match=rf"^{meta}: not readable JSON"):
        load_adapter(model, saved)
    data = json.loads(text)
    del data["base_hash"]
    meta.write_text(json.dumps(data))
    with pytest.raises(EngineError, match=rf"^{meta}: missing required keys \['base_hash'\]"):
        load_adapter(model, saved)
    meta.write_text(json.dumps({**json.loads(text), "rank": "four"}))
    with pytest.raises(EngineError, match=rf"^{meta}: rank: expected a positive integer"):
        load_adapter(model, saved)
    meta.unlink()
    with pytest.raises(EngineError, match=rf"^{meta}: missing; expected the histosynth metadata"):
        load_adapter(model, saved)
    with pytest.raises(EngineError, match="no such adapter folder"):
        load_adapter(model, saved.parent / "absent")
    assert untouched(model)


def test_wrong_target_modules_are_refused(saved: Path) -> None:
    model = make_tiny()
    config_path = saved / CONFIG_FILE
    config = json.loads(config_path.read_text())
    self_attention = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"]
    config_path.write_text(json.dumps({**config, "target_modules": self_attention}))
    expected = sorted(CROSS_ATTENTION_TARGETS)
    with pytest.raises(EngineError) as err:
        load_adapter(model, saved)
    assert str(err.value) == (
        f"{config_path}: target_modules: expected the cross-attention targets {expected}, "
        f"found {sorted(self_attention)}"
    )
    assert untouched(model)

    # an adapter made on self-attention with peft directly is not a style adapter either
    model.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=self_attention), adapter_name="geometry"
    )
    model.__dict__["_histosynth_adapters"] = {
        "geometry": AdapterInfo(name="geometry", base_hash="0" * 64, resolution=128)
    }
    with pytest.raises(EngineError, match=r"adapter 'geometry': expected the cross-attention"):
        save_adapter(model, "geometry", saved.parent / "geometry")
    assert not (saved.parent / "geometry").exists()


def test_rank_or_shape_mismatch_is_refused_naming_the_tensor(saved: Path) -> None:
    model = make_tiny()
    config_path, meta = saved / CONFIG_FILE, saved / METADATA_FILE
    config, info = json.loads(config_path.read_text()), json.loads(meta.read_text())
    config_path.write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(
        EngineError, match=rf"^{config_path}: r: expected r=4 \(as in {METADATA_FILE}\), found r=8"
    ):
        load_adapter(model, saved)
    meta.write_text(json.dumps({**info, "rank": 8}))
    key = "transformer_blocks.0.attn2.to_q.lora_A.weight"
    with pytest.raises(
        EngineError,
        match=rf"^{saved / WEIGHTS_FILE}: {key}: expected shape \[8, 64\] \(rank 8\), found \[4,",
    ):
        load_adapter(model, saved)

    # a narrower base: the tensors no longer fit its cross-attention
    config_path.write_text(json.dumps(config))
    meta.write_text(json.dumps(info))
    narrow = make_tiny(cross_attention_dim=48)
    with pytest.raises(EngineError, match=r"expected shape \[4, 48\] \(rank 4\), found \[4, 64\]"):
        load_adapter(narrow, saved)
    deeper = make_tiny(num_layers=3)
    with pytest.raises(EngineError, match=r"does not fit the base \(missing 8 tensors"):
        load_adapter(deeper, saved)
    assert untouched(model) and untouched(narrow) and untouched(deeper)


def test_listing_a_library_imports_neither_torch_nor_peft(saved: Path) -> None:
    code = (
        "import sys; from histosynth.synthesis.adapters import list_adapters; "
        f"infos = list_adapters({str(saved.parent)!r}); "
        "print([i.name for i in infos], 'torch' in sys.modules, 'peft' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "['he'] False False"
