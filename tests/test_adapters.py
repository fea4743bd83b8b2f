"""Properties of tbps's own adapters (wora, dora, lora, full, none) on a toy module and tiny CLIP.

One behaviour table over adapter kinds x models: outputs equal the base at initialisation,
magnitudes start at the norms of the *loaded* weights, only the intended parameters move in
training, merged equals unmerged, and a saved adapter reloads onto a fresh base exactly. The
method registry has its own tests: every registered method is in that table, passes the two
core properties, and appears in ``tbps train --help`` and in the README's table.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tbps.errors import TbpsError, UsageError
from tbps.models.adapters import (
    CONFIG_FILE,
    METHODS,
    REGISTRY,
    VARIANTS,
    WEIGHTS_FILE,
    AdaptedLinear,
    AdaptedMultiheadAttention,
    AdapterLayer,
    adapter_config,
    adapter_state_dict,
    apply_adapters,
    load_adapters,
    mark_base_model,
    merge_adapters,
    read_adapter_config,
    save_adapters,
)
from tbps.models.openclip import create
from tbps.models.protocol import count_parameters

# (method, wora_norm, adapter parameter names expected on an adapted layer, magnitude shape kind)
KINDS = {
    "wora-per-input": ("wora", "per-input", {"lora_A", "lora_B", "magnitude", "wora_alpha", "wora_beta"}, "per-input"),
    "wora-per-output": ("wora", "per-output", {"lora_A", "lora_B", "magnitude", "wora_alpha", "wora_beta"}, "per-output"),
    "dora": ("dora", "per-input", {"lora_A", "lora_B", "magnitude"}, "per-output"),  # dora ignores wora_norm
    "lora": ("lora", "per-input", {"lora_A", "lora_B"}, None),
    "full": ("full", "per-input", set(), None),
    "none": ("none", "per-input", set(), None),
}
ADAPTER_NAMES = {"lora_A", "lora_B", "magnitude", "wora_alpha", "wora_beta"}
# The base model alone moves by ~2e-6 when only its requires_grad flags change (torch then picks
# other CPU kernels), so the reference is the base with the flags the method leaves on W0. The
# rest of the gap is nn.MultiheadAttention's fused inference path (~1e-7), which wrappers skip.
INIT_TOL = {"rtol": 0.0, "atol": 1e-6}


class Toy(nn.Module):
    """Linear -> self-attention (masked, weights returned) -> cross-attention -> Linear."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.inp = nn.Linear(12, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.cross = nn.MultiheadAttention(16, 2, batch_first=batch_first, bias=False)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        a, weights = self.attn(h, h, h, key_padding_mask=pad, need_weights=True)
        c, _ = self.cross(a, h, h, need_weights=False)
        y = self.head(c + a)
        return torch.cat([y.flatten(), weights.flatten()])


def _toy(batch_first: bool) -> tuple[nn.Module, tuple, int]:
    torch.manual_seed(0)
    base = Toy(batch_first).eval()
    # "Pretrained" weights: loaded into the base before wrapping, so m must come from these.
    torch.manual_seed(1)
    base.load_state_dict(Toy(batch_first).state_dict())
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 12, generator=gen)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    return base, (x, pad), 4


# Tiny tensors: with 2 threads on a shared 2-core machine this file took ~4x longer.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip():
    loaded = create("tbps-tiny", seed=0)
    loaded.model.load_state_dict(create("tbps-tiny", seed=1).model.state_dict())
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 96, 32, generator=gen)
    tokens = loaded.tokenizer(["a man in a red jacket and black trousers", "a woman carrying a white bag"])
    return loaded.model, (images, tokens)


def _out(model: nn.Module, inputs: tuple) -> torch.Tensor:
    if len(inputs) == 2 and inputs[0].dim() == 4:  # CLIP: (images, tokens)
        return torch.cat([model.encode_image(inputs[0]), model.encode_text(inputs[1])])
    return model(*inputs)


def _loss(model: nn.Module, inputs: tuple) -> torch.Tensor:
    if inputs[0].dim() == 4:  # CLIP contrastive loss, which also reaches logit_scale
        img = F.normalize(model.encode_image(inputs[0]), dim=-1)
        txt = F.normalize(model.encode_text(inputs[1]), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T
        labels = torch.arange(len(img))
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    return model(*inputs).square().mean()


def _models(request, name: str):
    if name == "clip":
        base, inputs = request.getfixturevalue("clip")
        return base, inputs, 8
    return _toy(batch_first=name == "toy-batch-first")


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


MODELS = ["toy-batch-first", "toy-seq-first", "clip"]
_REFERENCES: dict[tuple[str, bool], torch.Tensor] = {}


def _reference(model_name: str, model: nn.Module, inputs: tuple) -> torch.Tensor:
    """The base model's output with the given requires_grad flags (computed once per flag set)."""
    key = (model_name, next(model.parameters()).requires_grad)
    if key not in _REFERENCES:
        with torch.no_grad():
            _REFERENCES[key] = _out(model, inputs)
    return _REFERENCES[key]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("model_name", MODELS)
def test_adapter_properties(request, model_name, kind, tmp_path):
    method, wora_norm, names, magnitude_kind = KINDS[kind]
    base, inputs, rank = _models(request, model_name)
    fresh = copy.deepcopy(base)
    reference = _reference(model_name, fresh.requires_grad_(method == "full"), inputs)
    model = apply_adapters(copy.deepcopy(base), method, rank=rank, wora_norm=wora_norm)

    # At initialisation: the base model's outputs; m = norms of the loaded weights.
    with torch.no_grad():
        torch.testing.assert_close(_out(model, inputs), reference, **INIT_TOL)
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer) and getattr(m, "method", None)]
    assert bool(layers) == bool(names)
    base_weights = dict(base.named_parameters())
    for name, layer in model.named_modules():
        if not isinstance(layer, AdapterLayer) or not getattr(layer, "method", None):
            continue
        own = {n for n, _ in layer.named_parameters(recurse=False)}
        assert own & ADAPTER_NAMES == names, name
        w0_name = "in_proj_weight" if isinstance(layer, AdaptedMultiheadAttention) else "weight"
        w0 = base_weights[f"{name}.{w0_name}"]
        assert layer.lora_A.shape == (rank, w0.shape[1]) and layer.lora_B.shape == (w0.shape[0], rank)
        assert not layer.lora_B.any()
        if magnitude_kind:
            dim = 0 if magnitude_kind == "per-input" else 1
            torch.testing.assert_close(layer.magnitude, w0.detach().norm(dim=dim, keepdim=True), rtol=0, atol=0)

    # Training: exactly the intended parameters move; W0 never does.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    all_names = {n for n, _ in model.named_parameters()}
    expected = {"full": all_names, "none": set()}.get(method, {n for n in all_names if n.rpartition(".")[2] in ADAPTER_NAMES})
    assert trainable == expected
    assert count_parameters(model)[0] == sum(p.numel() for n, p in model.named_parameters() if n in expected)
    before = _snapshot(model)
    if trainable:
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
        for _ in range(2):  # step 1 moves B (A's gradient is 0 while B = 0), step 2 moves A too
            opt.zero_grad()
            _loss(model, inputs).backward()
            # DDP without find_unused_parameters needs a gradient for every trainable parameter.
            assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
            opt.step()
        model.eval()
    after = _snapshot(model)
    changed = {n for n in after if not torch.equal(after[n], before[n])}
    assert changed == expected
    if method != "full":
        state = model.state_dict()
        assert all(torch.equal(state[n], v) for n, v in base.state_dict().items())  # W0, biases, the rest

    with torch.no_grad():
        trained = _out(model, inputs)
    if trainable:
        assert (trained - reference).abs().max() > 1e-3  # the steps perturbed the adapters

    # Save / load onto a fresh base: identical outputs.
    save_adapters(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]  # no temporaries left
    saved = set(adapter_state_dict(model))
    assert saved == expected
    if method != "full":
        assert not any(n.endswith(("weight", "bias")) for n in saved)  # never W0 or biases
    reloaded = load_adapters(copy.deepcopy(base), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(_out(reloaded, inputs), trained)
    assert adapter_config(reloaded) == adapter_config(model)

    # Merge: same outputs, plain modules, the base model's state dict keys and module types.
    merged = merge_adapters(model)
    with torch.no_grad():
        torch.testing.assert_close(_out(merged, inputs), trained, rtol=0, atol=1e-5)
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    assert list(merged.state_dict()) == list(base.state_dict())
    assert [type(m) for m in merged.modules()] == [type(m) for m in base.modules()]
    with pytest.raises(TbpsError, match="no adapters"):
        adapter_config(merged)
    fresh.load_state_dict(merged.state_dict())  # strict: loadable by the plain (open_clip) model


def test_clip_reaches_qkv_out_proj_and_mlp_of_both_towers(clip):
    base, _ = clip
    model = apply_adapters(copy.deepcopy(base))
    modules = set(adapter_config(model)["modules"])
    for tower in (base.visual.transformer, base.transformer):
        prefix = "visual.transformer" if tower is base.visual.transformer else "transformer"
        for i in range(len(tower.resblocks)):
            for suffix in ("attn", "attn.out_proj", "mlp.c_fc", "mlp.c_proj"):
                assert f"{prefix}.resblocks.{i}.{suffix}" in modules
    assert isinstance(model.transformer.resblocks[0].attn, AdaptedMultiheadAttention)
    assert isinstance(model.transformer.resblocks[0].attn.out_proj, AdaptedLinear)
    assert model.transformer.resblocks[0].get_weight_dtype() == torch.float32  # open_clip reads c_fc.weight


def test_targets_by_pattern(clip, tmp_path):
    base, inputs = clip
    model = apply_adapters(copy.deepcopy(base), "lora", targets=["c_fc", "visual.*.attn"])
    modules = adapter_config(model)["modules"]
    assert modules and all(n.endswith(".mlp.c_fc") or (n.startswith("visual.") and n.endswith(".attn")) for n in modules)
    assert sum(n.endswith("c_fc") for n in modules) == 7  # 4 image + 3 text blocks

    # A dotted pattern is a whole name: the text tower's block 0, not visual.transformer's.
    # out_proj alone: the attention is wrapped so the adapted out_proj is used, q/k/v stay plain.
    model = apply_adapters(copy.deepcopy(base), "wora", targets=["transformer.resblocks.0.attn.out_proj"])
    attn = model.transformer.resblocks[0].attn
    assert adapter_config(model)["modules"] == ["transformer.resblocks.0.attn.out_proj"]
    assert isinstance(attn, AdaptedMultiheadAttention) and not attn.adapts_in_proj
    with torch.no_grad():
        attn.out_proj.lora_B.normal_()
        changed = _out(model, inputs)
        assert (changed - _out(base, inputs)).abs().max() > 1e-3  # the adapter is on the path
        torch.testing.assert_close(_out(merge_adapters(model), inputs), changed, rtol=0, atol=1e-5)


def test_extra_trainable_is_trained_and_saved(clip, tmp_path):
    base, inputs = clip
    model = apply_adapters(copy.deepcopy(base), "wora", extra_trainable=["logit_scale"])
    assert model.logit_scale.requires_grad and "logit_scale" in adapter_state_dict(model)
    with torch.no_grad():
        model.logit_scale.add_(0.5)
    save_adapters(model, tmp_path)
    assert torch.equal(load_adapters(copy.deepcopy(base), tmp_path).logit_scale, model.logit_scale)


def test_autocast_bf16_forward_and_backward(clip):
    base, inputs = clip
    model = apply_adapters(copy.deepcopy(base), "wora").train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss(model, inputs)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


BAD = [
    # (apply_adapters kwargs, error type, words the message must contain)
    ({"method": "qlora"}, UsageError, ["method", "qlora", "wora"]),
    ({"rank": 0}, UsageError, ["rank", "0"]),
    ({"rank": 200}, UsageError, ["rank", "200", "visual.transformer.resblocks.0.attn", "128"]),
    ({"targets": ["*.c_fcc"]}, TbpsError, ["c_fcc", "visual.transformer.resblocks.*.mlp.c_fc", "transformer.resblocks.*.attn"]),
    ({"targets": ["mlp.c_fc"]}, TbpsError, ["mlp.c_fc", "globs over whole names"]),  # dotted: no suffix match
    ({"targets": ["*.ln_1"]}, TbpsError, ["ln_1", "available"]),
    ({"wora_norm": "per-row"}, UsageError, ["wora_norm", "per-row"]),
    ({"method": "lora", "wora_alpha": 4}, UsageError, ["wora_alpha", "lora"]),
    ({"lora_dropout": 0.1}, UsageError, ["lora_dropout", "known options"]),
    ({"method": "full", "targets": ["*.c_fc"]}, UsageError, ["targets", "full"]),
    ({"wora_beta": 0}, UsageError, ["wora_beta"]),
    ({"extra_trainable": ["temperature"]}, TbpsError, ["extra_trainable", "temperature", "logit_scale"]),
]


@pytest.mark.parametrize(("kwargs", "error", "words"), BAD, ids=[str(b[0]) for b in BAD])
def test_bad_options_fail_before_training(clip, kwargs, error, words):
    base, _ = clip
    model = copy.deepcopy(base)
    with pytest.raises(error) as info:
        apply_adapters(model, **kwargs)
    for word in words:
        assert word in str(info.value)


def test_adapting_twice_and_loading_a_mismatch_are_errors(clip, tmp_path):
    base, _ = clip
    model = apply_adapters(copy.deepcopy(base), "lora")
    with pytest.raises(UsageError, match="already has adapters"):
        apply_adapters(model, "lora")
    save_adapters(model, tmp_path / "a")
    toy, _, _ = _toy(batch_first=True)
    with pytest.raises(TbpsError):
        load_adapters(toy, tmp_path / "a")  # the toy's layers are not CLIP's
    with pytest.raises(TbpsError, match="not found"):
        load_adapters(copy.deepcopy(base), tmp_path / "missing")
    rank4 = apply_adapters(copy.deepcopy(base), "lora", rank=4)
    save_adapters(rank4, tmp_path / "b")
    (tmp_path / "a" / "adapter_model.safetensors").replace(tmp_path / "b" / "adapter_model.safetensors")
    with pytest.raises(TbpsError, match="wrong shape"):
        load_adapters(copy.deepcopy(base), tmp_path / "b")  # rank-8 tensors under a rank-4 config


def test_the_saved_config_names_the_base_model(clip, tmp_path):
    base, _ = clip
    model = apply_adapters(copy.deepcopy(base), "lora")
    save_adapters(model, tmp_path / "unnamed")
    assert read_adapter_config(tmp_path / "unnamed")["base_model"] is None  # nothing recorded: said, not guessed
    named = {"spec": "tbps-tiny", "seed": 0, "identity": {"spec": "tbps-tiny", "weights": "random(seed=0)"}}
    model = apply_adapters(mark_base_model(copy.deepcopy(base), named), "lora")  # recorded before adapting, kept through it
    save_adapters(model, tmp_path / "named")
    assert read_adapter_config(tmp_path / "named")["base_model"] == named
    save_adapters(model, tmp_path / "given", base_model={"spec": "ViT-B-16:openai"})
    assert read_adapter_config(tmp_path / "given")["base_model"] == {"spec": "ViT-B-16:openai"}
    assert load_adapters(copy.deepcopy(base), tmp_path / "named") is not None  # the new key loads as before


def test_top_level_re_exports():
    import tbps

    assert tbps.apply_adapters is apply_adapters and tbps.merge_adapters is merge_adapters


# ----------------------------------------------------------------------------- the method registry

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_registered_method_is_in_the_behaviour_table_and_declares_its_name():
    assert {KINDS[k][0] for k in KINDS} == set(METHODS)  # test_adapter_properties covers each method
    for name, cls in VARIANTS.items():
        assert cls.name == name and REGISTRY[name].endswith(f":{cls.__name__}")
        assert set(cls.parameters) <= ADAPTER_NAMES, f"{name}: name new parameters in ADAPTER_NAMES"


@pytest.mark.parametrize("method", list(VARIANTS))
def test_a_registered_method_starts_at_the_base_and_merges_to_what_it_computes(method):
    """The two properties every method must have, over the registry itself (a new method is tested as it lands)."""
    base, inputs, rank = _toy(batch_first=True)
    reference = _reference("toy-batch-first", copy.deepcopy(base).requires_grad_(False), inputs)
    model = apply_adapters(copy.deepcopy(base), method, rank=rank)
    with torch.no_grad():
        torch.testing.assert_close(_out(model, inputs), reference, **INIT_TOL)
        layers = [m for m in model.modules() if isinstance(m, AdapterLayer) and getattr(m, "method", None)]
        assert layers and all(m.variant is VARIANTS[method] for m in layers)
        for layer in layers:
            assert {n for n, _ in layer.named_parameters(recurse=False)} & ADAPTER_NAMES == set(VARIANTS[method].parameters)
            layer.lora_B.normal_(std=0.05)  # move away from the base: W' != W0
        moved = _out(model, inputs)
        assert (moved - reference).abs().max() > 1e-3
        torch.testing.assert_close(_out(merge_adapters(model), inputs), moved, rtol=0, atol=1e-5)


def test_every_method_appears_in_train_help_and_in_the_readme_table(cli):
    result = cli("train", "--help", env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    # The option's row (one line at 200 columns), not the example that also says --adapter.
    line = next(ln for ln in result.output.splitlines() if re.match(r"\W*--adapter\s", ln))
    trains = [m for m in METHODS if m != "none"]  # `tbps train --adapter none` is refused
    assert set(VARIANTS) <= set(trains) and all(re.search(rf"\b{m}\b", line) for m in trains), line
    section = README.read_text(encoding="utf-8").split("## Training with WoRA", 1)[1].split("\n## ", 1)[0]
    rows = {m.group(1) for m in re.finditer(r"^\| `([a-z0-9-]+)`", section, flags=re.MULTILINE)}
    assert set(METHODS) <= rows, f"README's --adapter table lacks {sorted(set(METHODS) - rows)}"
