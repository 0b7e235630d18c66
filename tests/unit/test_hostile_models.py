"""Hostile engine and adapter folders (issue 25): every file is checked before it is used.

Configs that would allocate without bound, JSON nested 100 000 deep, LoRA configs that
make peft build something else, NaN / Inf / absurd weights, missing or wrong checksums:
each is one :class:`EngineError` line naming the file and the key, raised before any
model class is built (the classes are patched to fail if they are). The folders are
real tiny ones (``save_engine`` / ``save_adapter``) changed at test time.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from histosynth.synthesis.adapters import (
    CONFIG_FILE,
    METADATA_FILE,
    WEIGHTS_FILE,
    create_adapter,
    load_adapter,
    read_adapter_info,
    save_adapter,
)
from histosynth.synthesis.config_limits import (
    LIMITS,
    MAX_JSON_DEPTH,
    record_weight_hashes,
    verify_weight_hashes,
)
from histosynth.synthesis.engine import (
    ENGINE_FILE,
    load_engine,
    save_engine,
    tiny_engine,
    tiny_transformer_config,
)
from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.models.encoders import TinyEncoder
from histosynth.synthesis.models.transformer import PixCellTransformer2DModel
from histosynth.synthesis.weights import embedded_folder, model_facts, read_engine_meta

TILE = 64
CONFIGS = {
    "transformer": "transformer/config.json",
    "vae": "vae/config.json",
    "encoder": "encoder/config.json",
    "scheduler": "scheduler/scheduler_config.json",
    "engine": ENGINE_FILE,
}


# transformer/config.json of StonyBrook-CVLab/PixCell-1024 (as tests/unit/test_transformer.py)
PIXCELL_1024_CONFIG = {
    "_class_name": "PixCellTransformer2DModel", "activation_fn": "gelu-approximate",
    "attention_bias": True, "attention_head_dim": 72, "attention_type": "default",
    "caption_channels": 1536, "caption_num_tokens": 16, "cross_attention_dim": 1152,
    "dropout": 0.0, "in_channels": 16, "interpolation_scale": 2,
    "norm_elementwise_affine": False, "norm_eps": 1e-06, "norm_num_groups": 32,
    "norm_type": "ada_norm_single", "num_attention_heads": 16, "num_embeds_ada_norm": 1000,
    "num_layers": 28, "out_channels": 32, "patch_size": 2, "sample_size": 128,
    "upcast_attention": False, "use_additional_conditions": False,
}

# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def saved_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with pytest.warns(UserWarning, match="UNTRAINED"):
        engine = tiny_engine(TILE, device="cpu")
    return save_engine(engine, tmp_path_factory.mktemp("engines") / "tiny")


@pytest.fixture
def engine_folder(saved_engine: Path, tmp_path: Path) -> Path:
    """A fresh copy of a saved tiny engine folder (64 px tiles)."""
    return Path(shutil.copytree(saved_engine, tmp_path / "engine"))


@pytest.fixture
def nothing_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building any model class fails the test: refusals must come first."""
    from diffusers import AutoencoderKL

    def built(*args, **kwargs):
        raise AssertionError("a model class was built from a hostile config")

    for cls, name in (
        (PixCellTransformer2DModel, "from_pretrained"),
        (PixCellTransformer2DModel, "from_config"),
        (AutoencoderKL, "from_pretrained"),
        (TinyEncoder, "from_config"),
    ):
        monkeypatch.setattr(cls, name, classmethod(built))


def edit_json(path: Path, **changes: object) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def refused(call: Callable[[], object], expected: str) -> str:
    """The one-line message ``call`` is refused with; it must contain ``expected``."""
    with pytest.raises(EngineError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and expected in message, message
    return message


def load(folder: Path) -> object:
    return load_engine(folder, device="cpu")


def tiny_base(seed: int = 0) -> PixCellTransformer2DModel:
    torch.manual_seed(seed)
    return PixCellTransformer2DModel.from_config(tiny_transformer_config(TILE)).eval()


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tiny_base()
    create_adapter(model, "style", base_id="tiny")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.25)
    folder = tmp_path_factory.mktemp("adapters") / "style"
    save_adapter(model, "style", folder)
    return folder


@pytest.fixture
def adapter(saved_adapter: Path, tmp_path: Path) -> Path:
    """A fresh copy of a saved style adapter for :func:`tiny_base`."""
    return Path(shutil.copytree(saved_adapter, tmp_path / "style"))


def untouched(model: torch.nn.Module) -> bool:
    return not getattr(model, "peft_config", None)


def rewrite_weights(folder: Path, change: Callable[[dict], None]) -> None:
    """Change the adapter's tensors and record the new file's sha256 (a consistent folder)."""
    tensors = load_file(folder / WEIGHTS_FILE)
    change(tensors)
    save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    digest = hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest()
    edit_json(folder / METADATA_FILE, weights_sha256=digest)


# --------------------------------------------------------------------------- 1. sizes

SIZE_CASES = [
    ("transformer", "num_layers", 10**6, "num_layers = 1000000 exceeds the limit 256"),
    ("transformer", "attention_head_dim", 10**9, "attention_head_dim = 1000000000 exceeds"),
    ("transformer", "sample_size", 10**7, "sample_size = 10000000 exceeds the limit 2048"),
    ("transformer", "caption_channels", 10**9, "caption_channels = 1000000000 exceeds"),
    ("transformer", "kv_compress_ratio", 10**9, "kv_compress_ratio = 1000000000 exceeds"),
    ("transformer", "patch_size", 0, "patch_size = 0 is below the minimum 1"),
    ("transformer", "num_layers", -3, "num_layers = -3 is below the minimum 1"),
    ("transformer", "num_layers", 2.5, "num_layers = 2.5: expected an integer from 1 to 256"),
    ("transformer", "num_layers", "2", "num_layers = '2': expected an integer"),
    ("transformer", "num_attention_heads", True, "num_attention_heads = True: expected an"),
    ("transformer", "kv_compress_blocks", list(range(10**4)), "kv_compress_blocks has 10000"),
    ("transformer", "interpolation_scale", float("inf"), "interpolation_scale = inf: expected"),
    ("vae", "layers_per_block", 10**6, "layers_per_block = 1000000 exceeds the limit 16"),
    ("vae", "block_out_channels", [8, 8, 16, 10**9], "block_out_channels[3] = 1000000000"),
    ("vae", "block_out_channels", [8] * 100, "block_out_channels has 100 items"),
    ("vae", "norm_num_groups", -4, "norm_num_groups = -4 is below the minimum 1"),
    ("encoder", "dim", 10**9, "dim = 1000000000 exceeds the limit 16384"),
    ("encoder", "crop", 10**9, "crop = 1000000000 exceeds the limit 8192"),
    ("encoder", "seed", -5, "seed = -5 is below the minimum 0"),
    ("scheduler", "num_train_timesteps", 10**10, "num_train_timesteps = 10000000000 exceeds"),
    ("scheduler", "trained_betas", [0.1] * 20_000, "trained_betas has 20000 items"),
    ("engine", "tile_size", 10**9, "tile_size = 1000000000 exceeds the limit 16384"),
    ("engine", "mpp", "half", "mpp = 'half': expected a finite number"),
    ("engine", "trained", "no", "trained = 'no': expected true or false"),
    ("engine", "abilities", {"tile_sizes": [64] * 1000}, "abilities.tile_sizes has 1000 items"),
]


@pytest.mark.parametrize(("part", "key", "value", "expected"), SIZE_CASES)
def test_a_size_over_its_limit_is_refused_before_anything_is_built(
    engine_folder: Path, nothing_built: None, part: str, key: str, value: object, expected: str
) -> None:
    path = engine_folder / CONFIGS[part]
    edit_json(path, **{key: value})
    message = refused(lambda: load(engine_folder), expected)
    assert message.startswith(f"{path}: "), message


def test_the_size_error_is_the_documented_line(engine_folder: Path, nothing_built: None) -> None:
    path = engine_folder / "transformer" / "config.json"
    edit_json(path, num_layers=1_000_000)
    with pytest.raises(EngineError) as caught:
        load(engine_folder)
    assert str(caught.value) == f"{path}: num_layers = 1000000 exceeds the limit 256"


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        # each key within its limit, together far too large
        ({"num_attention_heads": 256, "attention_head_dim": 1024},
         "num_attention_heads × attention_head_dim = 262144 exceeds the limit 16384"),
        ({"sample_size": 2048, "patch_size": 1}, "tokens exceeds the limit 65536"),
        ({"num_layers": 256, "num_attention_heads": 128, "attention_head_dim": 128},
         "parameters (num_layers, widths and tokens together) exceed the limit 4e+09"),
        ({"num_layers": 4, "kv_compress_ratio": 2, "kv_compress_blocks": [1, 200]},
         "kv_compress_blocks holds block 200; num_layers = 4"),
    ],
)
def test_sizes_that_multiply_past_the_limits_are_refused(
    engine_folder: Path, nothing_built: None, changes: dict, expected: str
) -> None:
    edit_json(engine_folder / "transformer" / "config.json", **changes)
    refused(lambda: load(engine_folder), expected)


def test_a_vae_too_large_as_a_whole_is_refused(engine_folder: Path, nothing_built: None) -> None:
    path = engine_folder / "vae" / "config.json"
    edit_json(path, block_out_channels=[4096] * 4, layers_per_block=16,
              norm_num_groups=32)
    refused(lambda: load(engine_folder), "parameters (block_out_channels × layers_per_block)")


def test_the_real_sizes_are_within_the_limits() -> None:
    """PixCell-1024 (as tests/unit/test_transformer.py publishes it), the SD3 VAE and
    the embedded engine pass; the table documents each limit."""
    from histosynth.synthesis.config_limits import (
        check_scheduler_config,
        check_transformer_config,
        check_vae_config,
    )
    check_transformer_config(PIXCELL_1024_CONFIG, "pixcell-1024/transformer/config.json")
    check_transformer_config({**PIXCELL_1024_CONFIG, "sample_size": 32, "caption_num_tokens": 1},
                             "pixcell-256/transformer/config.json")
    sd3 = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
           "latent_channels": 16, "norm_num_groups": 32, "sample_size": 1024,
           "in_channels": 3, "out_channels": 3, "scaling_factor": 1.5305,
           "shift_factor": 0.0609, "latents_mean": None, "latents_std": None}
    check_vae_config(sd3, "sd3/vae/config.json")
    folder = embedded_folder("default")
    for part in ("transformer", "vae"):
        check = check_transformer_config if part == "transformer" else check_vae_config
        check(json.loads((folder / part / "config.json").read_text()), part)
    check_scheduler_config(
        json.loads((folder / "scheduler" / "scheduler_config.json").read_text()), "scheduler"
    )
    assert all(limit.why for table in LIMITS.values() for limit in table.values())


def test_model_facts_refuses_a_hostile_engine_file_without_loading(engine_folder: Path) -> None:
    path = engine_folder / ENGINE_FILE
    edit_json(path, tile_size=-64)
    refused(lambda: model_facts(engine_folder), f"{path}: tile_size = -64 is below the minimum 1")


# --------------------------------------------------------------------------- 2. nesting

DEEP = {"[": "[" * 100_000, "{": '{"a":' * 100_000, "valid": "[" * 500 + "]" * 500}


@pytest.mark.parametrize("part", sorted(CONFIGS))
@pytest.mark.parametrize("kind", sorted(DEEP))
def test_deeply_nested_engine_json_is_one_line(
    engine_folder: Path, nothing_built: None, part: str, kind: str
) -> None:
    path = engine_folder / CONFIGS[part]
    if kind == "valid":  # parses, but diffusers would deep-copy it past the recursion limit
        edit_json(path, extra=json.loads(DEEP[kind]))
    else:
        path.write_text(DEEP[kind])
    message = refused(lambda: load(engine_folder), f"nested deeper than the limit {MAX_JSON_DEPTH}")
    assert message.startswith(f"{path}: "), message


@pytest.mark.parametrize("name", [METADATA_FILE, CONFIG_FILE])
@pytest.mark.parametrize("kind", sorted(DEEP))
def test_deeply_nested_adapter_json_is_one_line(adapter: Path, name: str, kind: str) -> None:
    path = adapter / name
    if kind == "valid":
        edit_json(path, extra=json.loads(DEEP[kind]))
    else:
        path.write_text(DEEP[kind])
    model = tiny_base()
    message = refused(lambda: load_adapter(model, adapter),
                      f"nested deeper than the limit {MAX_JSON_DEPTH}")
    assert message.startswith(f"{path}: "), message
    assert untouched(model)


# --------------------------------------------------------------------------- 3. peft fields

PEFT_FIELDS = [
    ("layer_replication", [[0, 1], [0, 1]]),
    ("modules_to_save", ["proj_out"]),
    ("target_parameters", ["transformer_blocks.0.attn2.to_q.weight"]),
    ("trainable_token_indices", [0, 1]),
    ("use_dora", True),
    ("rank_pattern", {"attn2.to_q": 64}),
    ("alpha_pattern", {"attn2.to_q": 1e6}),
    ("init_lora_weights", "pissa"),
    ("init_lora_weights", "olora"),
    ("init_lora_weights", False),
    ("lora_bias", True),
    ("exclude_modules", ["attn2.to_v"]),
    ("layers_to_transform", [0]),
    ("use_rslora", True),
    ("bias", "all"),
    ("loftq_config", {"loftq_bits": 4}),
    ("megatron_config", {"tensor_model_parallel_size": 2}),
    ("use_dora", 0),
]


@pytest.mark.parametrize(("key", "value"), PEFT_FIELDS)
def test_lora_fields_histosynth_does_not_write_are_refused(
    adapter: Path, key: str, value: object
) -> None:
    path = adapter / CONFIG_FILE
    edit_json(path, **{key: value})
    model = tiny_base()
    message = refused(lambda: load_adapter(model, adapter), f"{path}: {key} = ")
    assert "Traceback" not in message and untouched(model)


def test_harmless_defaults_and_unknown_keys_still_load(adapter: Path) -> None:
    edit_json(adapter / CONFIG_FILE, use_dora=False, modules_to_save=None, rank_pattern={},
              init_lora_weights=True, lora_dropout=0, a_future_peft_key={"x": 1})
    model = tiny_base()
    assert load_adapter(model, adapter).name == "style"


@pytest.mark.parametrize(
    ("name", "changes", "expected"),
    [
        (CONFIG_FILE, {"r": 10**6}, "r = 1000000 exceeds the limit 512"),
        (CONFIG_FILE, {"r": True}, "r = True: expected an integer"),
        (CONFIG_FILE, {"lora_alpha": float("nan")}, "lora_alpha = nan: expected a finite"),
        (CONFIG_FILE, {"target_modules": "attn2.*"}, "target_modules: expected a list"),
        (METADATA_FILE, {"rank": 10**6}, "rank = 1000000 exceeds the limit 512"),
        (METADATA_FILE, {"alpha": 1e300}, "alpha = 1e+300 exceeds the limit 4096"),
        (METADATA_FILE, {"resolution": 10**9}, "resolution = 1000000000 exceeds the limit"),
    ],
)
def test_adapter_sizes_over_their_limits_are_refused(
    adapter: Path, name: str, changes: dict, expected: str
) -> None:
    path = adapter / name
    edit_json(path, **changes)
    model = tiny_base()
    refused(lambda: load_adapter(model, adapter), f"{path}: {expected}")
    assert untouched(model)


# --------------------------------------------------------------------------- 4. weights

KEY = "transformer_blocks.0.attn2.to_q.lora_B.weight"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (float("nan"), "not finite (NaN or Inf values)"),
        (float("inf"), "not finite (NaN or Inf values)"),
        (1e30, "max |w| = 1e+30 exceeds the limit 10000"),
    ],
)
def test_absurd_adapter_weights_are_refused_at_load(
    adapter: Path, value: float, expected: str
) -> None:
    def poison(tensors: dict) -> None:
        tensors["base_model.model." + KEY][0, 0] = value

    rewrite_weights(adapter, poison)
    model = tiny_base()
    with pytest.raises(EngineError) as caught:
        load_adapter(model, adapter)
    assert str(caught.value) == f"{adapter / WEIGHTS_FILE}: {KEY}: {expected}"
    assert untouched(model)


@pytest.mark.parametrize("part", ["transformer", "vae", "encoder"])
def test_non_finite_engine_weights_are_refused_at_load(engine_folder: Path, part: str) -> None:
    file = engine_folder / part / "diffusion_pytorch_model.safetensors"
    tensors = load_file(file)
    key = next(k for k, v in sorted(tensors.items()) if v.is_floating_point())
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(EngineError) as caught:
        load(engine_folder)
    assert str(caught.value) == f"{file}: {key}: not finite (NaN or Inf values)"


# --------------------------------------------------------------------------- 5. adapter hash


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, "missing required keys ['weights_sha256']"),
        ("", "weights_sha256: expected 64 lower-case hex digits (sha256), found ''"),
        ("AB" * 32, "weights_sha256: expected 64 lower-case hex digits"),
        (42, "weights_sha256: expected 64 lower-case hex digits (sha256), found 42"),
    ],
)
def test_the_adapter_weights_checksum_is_required(
    adapter: Path, value: object, expected: str
) -> None:
    path = adapter / METADATA_FILE
    data = json.loads(path.read_text())
    if value is None:
        del data["weights_sha256"]
    else:
        data["weights_sha256"] = value
    path.write_text(json.dumps(data))
    model = tiny_base()
    refused(lambda: read_adapter_info(adapter), f"{path}: {expected}")
    refused(lambda: load_adapter(model, adapter), f"{path}: {expected}")
    assert untouched(model)


@pytest.mark.parametrize("name", [METADATA_FILE, CONFIG_FILE, WEIGHTS_FILE, "folder"])
def test_an_adapter_file_linked_out_of_its_folder_is_refused(
    adapter: Path, tmp_path: Path, name: str
) -> None:
    """A file (or the whole adapter folder in a library) that is a link leading out of
    its folder is refused by name, even when its content would pass every check."""
    from histosynth.synthesis.adapters import list_adapters

    elsewhere = tmp_path / "elsewhere"
    if name == "folder":
        library = tmp_path / "library"
        library.mkdir()
        shutil.move(adapter, elsewhere)
        (library / "style").symlink_to(elsewhere, target_is_directory=True)
        refused(lambda: list_adapters(library), f"{library / 'style'}: a link to {elsewhere}")
        return
    elsewhere.mkdir()
    target = elsewhere / name
    shutil.move(adapter / name, target)
    (adapter / name).symlink_to(target)
    model = tiny_base()
    refused(lambda: load_adapter(model, adapter), f"{adapter / name}: a link to {target}")
    assert untouched(model)


def test_the_checksum_is_verified_before_the_weights_are_parsed(
    adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    parsed = []
    monkeypatch.setattr(safetensors.torch, "load", lambda *a, **k: parsed.append(a))
    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: parsed.append(a))
    weights = adapter / WEIGHTS_FILE
    weights.write_bytes(b"\xff" * 64 + weights.read_bytes())  # a hostile header in front
    refused(lambda: load_adapter(tiny_base(), adapter), f"{weights}: checksum mismatch")
    assert parsed == []


@pytest.mark.parametrize("dtype", ["F8_E8M0", "BOGUS"])
def test_a_vouched_for_file_of_an_unknown_dtype_is_one_line(adapter: Path, dtype: str) -> None:
    """Its sha256 recorded, so parsed: the parser's own errors are one line too."""
    import struct

    header = json.dumps({KEY: {"dtype": dtype, "shape": [2], "data_offsets": [0, 2]}}).encode()
    data = struct.pack("<Q", len(header)) + header + b"\0\0"
    (adapter / WEIGHTS_FILE).write_bytes(data)
    edit_json(adapter / METADATA_FILE, weights_sha256=hashlib.sha256(data).hexdigest())
    model = tiny_base()
    refused(lambda: load_adapter(model, adapter),
            f"{adapter / WEIGHTS_FILE}: not a readable safetensors file")
    assert untouched(model)


# --------------------------------------------------------------------------- 6. engine hashes


def test_a_published_engine_checksum_is_verified_before_loading(
    engine_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = record_weight_hashes(engine_folder)
    assert sorted(manifest) == [
        "encoder/diffusion_pytorch_model.safetensors",
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    assert load(engine_folder).tile_size == TILE  # the checksums match

    vae = engine_folder / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(vae.read_bytes())
    data[-3] ^= 0xFF
    vae.write_bytes(bytes(data))
    from diffusers import AutoencoderKL

    def built(*args, **kwargs):
        raise AssertionError("opened before its checksum was verified")

    monkeypatch.setattr(PixCellTransformer2DModel, "from_pretrained", classmethod(built))
    monkeypatch.setattr(AutoencoderKL, "from_pretrained", classmethod(built))
    message = refused(lambda: load(engine_folder), f"{vae}: checksum mismatch: expected sha256")
    assert f"(as in {ENGINE_FILE})" in message

    stray = engine_folder / "encoder" / "extra.safetensors"
    stray.write_bytes(b"x")
    record_weight_hashes(engine_folder)
    stray.unlink()
    refused(lambda: load(engine_folder), f"{stray}: missing; {ENGINE_FILE} lists its sha256")


@pytest.mark.parametrize(
    ("manifest", "expected"),
    [
        ({"../../etc/passwd": "0" * 64}, "expected <component>/<file>"),
        ({"vae/diffusion_pytorch_model.safetensors": "xyz"}, "expected 64 lower-case hex"),
        ("everything is fine", "weights_sha256: expected an object"),
    ],
)
def test_a_malformed_engine_manifest_is_refused(
    engine_folder: Path, nothing_built: None, manifest: object, expected: str
) -> None:
    edit_json(engine_folder / ENGINE_FILE, weights_sha256=manifest)
    refused(lambda: load(engine_folder), f"{engine_folder / ENGINE_FILE}: weights_sha256")
    refused(lambda: load(engine_folder), expected)


def test_an_unlisted_weight_file_is_refused(engine_folder: Path, nothing_built: None) -> None:
    record_weight_hashes(engine_folder)
    stray = engine_folder / "transformer" / "diffusion_pytorch_model-00002.safetensors"
    stray.write_bytes(b"\0")
    refused(lambda: load(engine_folder), f"{stray}: not listed in {ENGINE_FILE}'s weights_sha256")


def test_the_embedded_engine_publishes_its_checksums_and_they_match() -> None:
    folder = embedded_folder("default")
    meta = read_engine_meta(folder / ENGINE_FILE)
    assert len(meta["weights_sha256"]) == 3
    assert all(re.fullmatch(r"[0-9a-f]{64}", v) for v in meta["weights_sha256"].values())
    paths = {c: folder / c for c in ("transformer", "vae", "encoder")}
    verify_weight_hashes(folder, meta, paths)  # raises on a mismatch


# --------------------------------------------------------------------------- the CLI


def test_the_command_line_prints_one_line_and_exits_1(
    invoke, demo_project: Path, engine_folder: Path, adapter: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    common = ["synthesize", "--project", demo_project, "--class", "Vessel", "--count", 1,
              "--model", engine_folder, "--steps", 1]
    config = engine_folder / "transformer" / "config.json"
    original = config.read_text()
    edit_json(config, num_layers=10**6)
    result = invoke(*common, "--out", tmp_path / "a")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"histosynth: error: {config}: num_layers = 1000000 exceeds the limit 256"
    )
    assert not (tmp_path / "a" / "index.csv").exists()

    config.write_text(original)  # a sound engine, a poisoned adapter
    model = load(engine_folder).transformer
    create_adapter(model, "poisoned", base_id="tiny")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.fill_(float("inf"))
    save_adapter(model, "poisoned", tmp_path / "library" / "poisoned")
    monkeypatch.setenv("HISTOSYNTH_ADAPTERS", str(tmp_path / "library"))
    result = invoke(*common, "--adapter", "poisoned", "--out", tmp_path / "b")
    assert result.exit_code == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("histosynth: error: ") and "not finite (NaN or Inf values)" in line
    assert str(tmp_path / "library" / "poisoned" / WEIGHTS_FILE) in line
