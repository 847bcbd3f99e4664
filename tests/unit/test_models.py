"""The model zoo: per-block seeding, splits, stage weights, profiling, user models."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save
from torch import nn

from doramesh import models
from doramesh.errors import Internal, InvalidArgument, NotFound
from doramesh.models import ModelFactory, ModelSpec, block_generator, seeded_factory
from doramesh.models.llama import LlamaConfig, llama

ZOO = ["mlp-tiny", "resnet18", "resnet50", "vit-base", "gpt2-small", "gpt2-medium", "llama-1b"]

# Small per-sample shapes so forward passes stay cheap; weights do not depend on them.
SMALL_SHAPE: dict[str, tuple[int, ...] | None] = {
    "mlp-tiny": None,
    "resnet18": (3, 64, 64),
    "vit-base": (3, 32, 32),
    "gpt2-small": (8,),
}


# --- a user model, as a user would write one -------------------------------------------------


def _affine_blocks(seed: int, first: int, last: int) -> list[nn.Module]:
    """Three Linear+Tanh blocks, each seeded from (seed, block index) only."""
    blocks: list[nn.Module] = []
    for i in range(first, last + 1):
        g = block_generator(seed, i)
        linear = nn.Linear(4, 4)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(4, 4, generator=g) * 0.5)
            linear.bias.copy_(torch.randn(4, generator=g) * 0.1)
        blocks.append(nn.Sequential(linear, nn.Tanh()))
    return blocks


TINY_USER_MODEL = ModelFactory(
    spec=ModelSpec(name="tiny-affine", num_blocks=3, sample_shape=(4,), input_dtype=torch.float32),
    build=_affine_blocks,
)


def make_tiny_user_model() -> ModelFactory:
    return TINY_USER_MODEL


@pytest.fixture
def registered() -> Iterator[str]:
    models.register("tiny-user", TINY_USER_MODEL)
    yield "tiny-user"
    models.unregister("tiny-user")


# --- helpers ---------------------------------------------------------------------------------


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(x)
    return out


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module")
def full_models() -> dict[str, nn.Sequential]:
    return {name: models.build_blocks(name, seed=11) for name in SMALL_SHAPE}


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# --- names and errors ------------------------------------------------------------------------


def test_names_lists_the_zoo() -> None:
    assert set(ZOO) <= set(models.names())


def test_specs_describe_inputs() -> None:
    gpt2 = models.get_spec("gpt2-small")
    assert (gpt2.num_blocks, gpt2.input_dtype, gpt2.vocab_size) == (14, torch.int64, 50257)
    assert models.get_spec("gpt2-medium").num_blocks == 26
    assert models.get_spec("llama-1b").num_blocks == 18
    assert models.get_spec("resnet18").num_blocks == 10
    assert models.get_spec("resnet50").num_blocks == 18
    assert models.get_spec("vit-base").sample_shape == (3, 224, 224)


def test_unknown_model_is_not_found() -> None:
    for call in (
        lambda: models.get_spec("no-such-model"),
        lambda: models.build_blocks("no-such-model", 0),
        lambda: models.layer_table("no-such-model"),
        lambda: models.get_spec("no_such_pkg.mod:factory"),
    ):
        with pytest.raises(NotFound):
            call()


@pytest.mark.parametrize(
    ("first", "last"), [(-1, 2), (3, 2), (0, 4), (4, None), (1.0, 2), (True, 2)]
)
def test_bad_ranges_are_invalid(first: int, last: int | None) -> None:
    with pytest.raises(InvalidArgument):
        models.build_blocks("mlp-tiny", 0, first, last)
    if last is not None:
        with pytest.raises(InvalidArgument):
            models.stage_weights("mlp-tiny", 0, first, last)


def test_example_input_is_deterministic() -> None:
    ids = models.example_input("gpt2-small", 3, seed=5)
    assert ids.shape == (3, 32) and ids.dtype == torch.int64
    assert 0 <= int(ids.min()) and int(ids.max()) < 50257
    assert torch.equal(ids, models.example_input("gpt2-small", 3, seed=5))
    img = models.example_input("resnet18", 2, sample_shape=(3, 64, 64))
    assert img.shape == (2, 3, 64, 64) and img.dtype == torch.float32


@pytest.mark.parametrize(
    ("name", "batch", "shape"),
    [("mlp-tiny", 0, None), ("gpt2-small", 1, (2000,)), ("resnet18", 1, (64, 64))],
)
def test_bad_example_input_is_invalid(name: str, batch: int, shape: tuple[int, ...] | None) -> None:
    with pytest.raises(InvalidArgument):
        models.example_input(name, batch, sample_shape=shape)


# --- per-block seeding and splits ------------------------------------------------------------


@pytest.mark.parametrize("name", list(SMALL_SHAPE))
def test_split_matches_full_model(name: str, full_models: dict[str, nn.Sequential]) -> None:
    full = full_models[name]
    last = len(full) - 1
    x = models.example_input(name, 2, seed=1, sample_shape=SMALL_SHAPE[name])
    expected = _run(full, x)
    assert torch.isfinite(expected).all()
    # Every split of the small models, the ends and the middle of the big ones.
    splits = range(last) if last < 12 else (0, last // 2, last - 1)
    for k in splits:
        head = models.build_blocks(name, 11, 0, k)
        tail = models.build_blocks(name, 11, k + 1, last)
        assert (_run(tail, _run(head, x)) - expected).abs().max() <= 1e-6, k
        # Same global keys, same bits as the full model's blocks.
        _assert_same_state(head, full[: k + 1])
        _assert_same_state(tail, full[k + 1 :])


def test_seed_changes_weights() -> None:
    a = models.build_blocks("mlp-tiny", 1)
    b = models.build_blocks("mlp-tiny", 2)
    assert not torch.equal(a.state_dict()["0.fc.weight"], b.state_dict()["0.fc.weight"])


def test_built_blocks_are_in_eval_mode_with_global_names() -> None:
    stage = models.build_blocks("resnet18", 0, 3, 5)
    assert not stage.training and all(not m.training for m in stage.modules())
    assert [name for name, _ in stage.named_children()] == ["3", "4", "5"]


def test_init_must_fill_every_tensor() -> None:
    spec = ModelSpec(name="forgetful", num_blocks=1, sample_shape=(2,), input_dtype=torch.float32)

    def init(i: int, block: nn.Module, fill: models.BlockInit) -> None:
        assert isinstance(block, nn.Linear)
        fill.uniform_std(block.weight, 0.1)  # forgets the bias

    factory = seeded_factory(spec, lambda i: nn.Linear(2, 2), init)
    with pytest.raises(Internal, match="bias"):
        factory(0, 0, 0)


# --- stage weights ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "first", "last"),
    [("mlp-tiny", 0, 3), ("resnet18", 2, 4), ("gpt2-small", 1, 2), ("vit-base", 0, 1)],
)
def test_stage_weights_round_trip_is_bit_identical(name: str, first: int, last: int) -> None:
    data, digest = models.stage_weights(name, 7, first, last)
    again, digest_again = models.stage_weights(name, 7, first, last)
    assert (data, digest) == (again, digest_again)
    assert len(digest) == 64

    loaded = models.load_stage(name, first, last, data)
    built = models.build_blocks(name, 7, first, last)
    _assert_same_state(loaded, built)
    assert not loaded.training
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in loaded.parameters())

    x = models.example_input(name, 1, sample_shape=SMALL_SHAPE[name])
    x = _run(models.build_blocks(name, 7, 0, first - 1), x) if first > 0 else x
    assert torch.equal(_run(loaded, x), _run(built, x))


def test_digest_depends_on_seed_and_range() -> None:
    digests = {
        models.stage_weights("mlp-tiny", 0, 0, 1)[1],
        models.stage_weights("mlp-tiny", 1, 0, 1)[1],
        models.stage_weights("mlp-tiny", 0, 1, 2)[1],
    }
    assert len(digests) == 3


def test_load_stage_rejects_mismatched_weights() -> None:
    data, _ = models.stage_weights("mlp-tiny", 0, 1, 2)
    with pytest.raises(InvalidArgument, match="for"):
        models.load_stage("mlp-tiny", 0, 1, data)  # another range
    with pytest.raises(InvalidArgument):
        models.load_stage("mlp-tiny", 1, 2, b"not safetensors at all")
    with pytest.raises(InvalidArgument):
        models.load_stage("mlp-tiny", 1, 2, data[: len(data) // 2])

    good = models.build_blocks("mlp-tiny", 0, 1, 2).state_dict()
    missing = {k: v for k, v in good.items() if k != "2.fc.bias"}
    with pytest.raises(InvalidArgument, match="missing"):
        models.load_stage("mlp-tiny", 1, 2, st_save(missing))
    retyped = {**good, "2.fc.bias": good["2.fc.bias"].half()}
    with pytest.raises(InvalidArgument, match=r"2\.fc\.bias"):
        models.load_stage("mlp-tiny", 1, 2, st_save(retyped))
    reshaped = {**good, "2.fc.bias": torch.zeros(3)}
    with pytest.raises(InvalidArgument, match=r"2\.fc\.bias"):
        models.load_stage("mlp-tiny", 1, 2, st_save(reshaped))
    # Bare safetensors without doramesh metadata load when they match exactly.
    _assert_same_state(
        models.load_stage("mlp-tiny", 1, 2, st_save(good)), models.build_blocks("mlp-tiny", 0, 1, 2)
    )


# --- layer tables ----------------------------------------------------------------------------


def _param_count(name: str) -> float:
    return sum(layer.param_bytes for layer in models.layer_table(name).layers) / 4


@pytest.mark.parametrize("name", ZOO)
def test_layer_table_shapes(name: str) -> None:
    spec = models.get_spec(name)
    table = models.layer_table(name)
    assert table.model == name and len(table) == spec.num_blocks
    assert table.input_bytes == math.prod(spec.sample_shape) * (
        8 if spec.input_dtype == torch.int64 else 4
    )
    for layer in table.layers:
        assert layer.param_bytes > 0 and layer.activation_bytes > 0 and layer.workspace_bytes >= 0
        assert layer.gflops >= 0
    # Only an embedding lookup is free of FLOPs.
    assert all(layer.gflops > 0 for layer in table.layers[1:])
    assert len({layer.name for layer in table.layers}) == len(table)
    assert models.layer_table(name) is table  # cached


def test_layer_table_figures_match_public_sizes() -> None:
    gpt2_tied = 124_439_808
    assert _param_count("gpt2-small") == pytest.approx(gpt2_tied + 50257 * 768, rel=0.01)
    assert _param_count("gpt2-medium") == pytest.approx(354_823_168 + 50257 * 1024, rel=0.01)
    llama_tied = 1_235_814_400  # Llama-3.2-1B; the untied head adds vocab * hidden
    assert _param_count("llama-1b") == pytest.approx(llama_tied + 128256 * 2048, rel=0.01)
    assert _param_count("resnet18") == pytest.approx(11.69e6, rel=0.01)
    assert _param_count("resnet50") == pytest.approx(25.56e6, rel=0.01)
    assert _param_count("vit-base") == pytest.approx(86.57e6, rel=0.01)

    def total_gflops(name: str) -> float:
        return sum(layer.gflops for layer in models.layer_table(name).layers)

    # Published multiply-adds at 224x224, times 2.
    assert total_gflops("resnet18") == pytest.approx(2 * 1.82, rel=0.05)
    assert total_gflops("resnet50") == pytest.approx(2 * 4.11, rel=0.05)
    assert total_gflops("vit-base") == pytest.approx(2 * 17.56, rel=0.05)
    # A decoder's forward is about 2 FLOPs per weight per token.
    llama = models.layer_table("llama-1b")
    dense = sum(layer.param_bytes / 4 for layer in llama.layers[1:])
    assert total_gflops("llama-1b") == pytest.approx(2 * dense * 32 / 1e9, rel=0.05)
    # GPT-2 ships activations of [T, 768] floats between blocks.
    assert models.layer_table("gpt2-small").layers[3].activation_bytes == 32 * 768 * 4


def test_layer_table_is_meta_only_and_quick() -> None:
    config = LlamaConfig(
        dim=4096,
        layers=32,
        heads=32,
        kv_heads=32,
        hidden=11008,
        vocab=32000,
        rope_theta=10000.0,
        rope_scaling=None,
        max_seq_len=4096,
    )
    models.register("llama-7b-test", llama("llama-7b-test", config))
    try:
        rss = _rss_bytes()
        started = time.monotonic()
        table = models.layer_table("llama-7b-test", (64,))
        small = models.layer_table("llama-1b", (16,))
        assert time.monotonic() - started < 20
        assert _rss_bytes() - rss < 512 * 2**20  # a real 7B build would be 27 GB
    finally:
        models.unregister("llama-7b-test")
    assert sum(layer.param_bytes for layer in table.layers) / 4 == pytest.approx(6.74e9, rel=0.01)
    assert len(small) == 18


def test_layer_table_sample_shapes() -> None:
    small = models.layer_table("resnet18", (3, 64, 64))
    assert small.layers[0].activation_bytes == 64 * 16 * 16 * 4
    assert sum(layer.gflops for layer in small.layers) < sum(
        layer.gflops for layer in models.layer_table("resnet18").layers
    )
    assert models.layer_table("vit-base", (3, 32, 32)).layers[0].activation_bytes == 5 * 768 * 4
    for name, shape in [("gpt2-small", (2000,)), ("resnet18", (64, 64)), ("mlp-tiny", (0,))]:
        with pytest.raises(InvalidArgument):
            models.layer_table(name, shape)
    with pytest.raises(InvalidArgument):
        models.layer_table("mlp-tiny", (32,))  # a shape the first Linear cannot take


# --- user models -----------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["TINY_USER_MODEL", "make_tiny_user_model"])
def test_user_model_by_import_path(target: str) -> None:
    name = f"{__name__}:{target}"
    spec = models.get_spec(name)
    assert (spec.name, spec.num_blocks) == (name, 3)
    x = models.example_input(name, 2)
    full = models.build_blocks(name, 3)
    split = _run(models.build_blocks(name, 3, 2, 2), _run(models.build_blocks(name, 3, 0, 1), x))
    assert (split - _run(full, x)).abs().max() <= 1e-6
    data, _ = models.stage_weights(name, 3, 1, 2)
    _assert_same_state(models.load_stage(name, 1, 2, data), models.build_blocks(name, 3, 1, 2))
    table = models.layer_table(name)
    assert len(table) == 3 and table.layers[0].param_bytes == 20 * 4


def test_import_path_must_name_a_factory() -> None:
    with pytest.raises(NotFound):
        models.get_spec(f"{__name__}:NO_SUCH_ATTRIBUTE")
    with pytest.raises(InvalidArgument):
        models.get_spec("doramesh.types:MIB")


def test_register_user_model(registered: str) -> None:
    assert registered in models.names()
    assert models.get_spec(registered).name == registered
    assert models.layer_table(registered).model == registered
    with pytest.raises(InvalidArgument):
        models.register("a:b", TINY_USER_MODEL)
