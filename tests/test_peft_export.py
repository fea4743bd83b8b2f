"""``tbps export RUN --peft DIR``: what PEFT's ``PeftModel.from_pretrained(base, DIR)`` loads gives the run's embeddings.

Real few-step runs of tbps-tiny (LoRA on every layer, DoRA on the MLP layers), exported through
the CLI, loaded with PEFT onto a freshly loaded base model and compared image by image and
caption by caption; what PEFT cannot represent is refused in one line.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from tbps.models import load
from tbps.models.adapters import CONFIG_FILE, WEIGHTS_FILE, read_adapter_config
from tbps.models.runs import PEFT_EXPORT_FILE, load_run

peft = pytest.importorskip("peft", reason="peft (the test extra) checks the export against PEFT itself")
from peft.tuners.lora import LoraLayer  # noqa: E402 - after the importorskip that guards it

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--model", "tbps-tiny", "--batch-size", "8", "--workers", "0", "--precision", "fp32", "--device", "cpu", "--warmup", "1",
        "--lr", "3e-3", "--quiet"]
CAPTIONS = ["a man in a red shirt and black trousers", "a woman with a white bag", "a person in a green coat"]


@pytest.fixture(scope="module")
def world(synth_world) -> Path:
    return synth_world(0)


def _train(cli, world: Path, out: Path, *args: str) -> Path:
    res = cli("train", "--data", world / "benchmark" / "reid_raw.json", "--out", out, "--steps", "2", *FAST, *args)
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def runs(cli, world, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peft-runs")
    return {
        # q/k/v of every attention and every MLP layer (an attention's out_proj PEFT cannot take: see the refusals)
        "lora": _train(cli, world, root / "lora", "--adapter", "lora", "--rank", "4", "--lora-alpha", "8", "--targets", "attn,c_fc,c_proj"),
        "dora": _train(cli, world, root / "dora", "--adapter", "dora", "--rank", "4", "--targets", "c_fc,c_proj"),
    }


def _inputs(loaded, world: Path) -> tuple[torch.Tensor, torch.Tensor]:
    paths = sorted((world / "benchmark" / "imgs").rglob("*.jpg"))[:4]
    assert len(paths) == 4
    pixels = torch.stack([loaded.preprocess(Image.open(p)) for p in paths])
    return pixels, loaded.tokenizer(CAPTIONS)


def _embed(model: torch.nn.Module, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.encode_image(pixels), model.encode_text(tokens)


def _peft_modules(peft_model) -> set[str]:
    """The module names PEFT adapted, an attention's out_proj left out (PEFT adapts it with its q/k/v)."""
    return {n for n, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer) and not n.endswith(".base_layer.out_proj")}


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_peft_loads_the_export_onto_a_fresh_base_with_the_runs_embeddings(runs, world, cli, tmp_path, method):
    run = runs[method]
    out = tmp_path / "peft"
    res = cli("export", run, "--peft", out)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, PEFT_EXPORT_FILE])

    config = peft.PeftConfig.from_pretrained(str(out))
    assert config.peft_type == peft.PeftType.LORA and config.base_model_name_or_path == "tbps-tiny"
    assert config.use_dora is (method == "dora") and config.r == 4

    trained = load_run(run)
    base = load("tbps-tiny", seed=0)  # freshly loaded: PEFT adapts it in place
    pixels, tokens = _inputs(base, world)
    before = _embed(base.model, pixels, tokens)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft.PeftModel.from_pretrained(base.model, str(out)).eval()
    assert not [w for w in caught if "key" in str(w.message).lower()], [str(w.message) for w in caught]  # no missing/unexpected keys

    assert _peft_modules(peft_model) == set(read_adapter_config(run / "last")["modules"])  # exactly the layers tbps adapted
    for ours, theirs, untouched in zip(_embed(trained.model, pixels, tokens), _embed(peft_model, pixels, tokens), before):
        assert (ours - theirs).abs().max().item() <= 1e-5
        assert (ours - untouched).abs().max().item() > 1e-4  # the adapters changed the embeddings: the match is not vacuous

    record = json.loads((out / PEFT_EXPORT_FILE).read_text())
    assert record["exported_from"]["run"] == method and record["base_model"]["spec"] == "tbps-tiny"
    assert record["logit_scale"] == pytest.approx(trained.model.logit_scale.item())


def test_every_adapter_config_names_its_base_model(runs, tiny_clip):
    for run in runs.values():
        for which in ("last",):
            base = read_adapter_config(run / which)["base_model"]
            assert base["spec"] == "tbps-tiny" and base["seed"] == 0 and base["identity"] == tiny_clip.identity


def test_the_pattern_matches_the_text_tower_without_the_image_towers_twin(cli, world, tmp_path):
    run = _train(cli, world, tmp_path / "text", "--adapter", "lora", "--rank", "4", "--targets", "transformer.resblocks.0.mlp.c_fc")
    assert cli("export", run, "--peft", tmp_path / "peft").exit_code == 0
    peft_model = peft.PeftModel.from_pretrained(load("tbps-tiny", seed=0).model, str(tmp_path / "peft"))
    # A list of names would be matched as suffixes and catch visual.transformer.resblocks.0.mlp.c_fc too.
    assert _peft_modules(peft_model) == {"transformer.resblocks.0.mlp.c_fc"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--adapter", "wora"], "cannot export wora adapters in PEFT's format: no PEFT method learns WoRA's alpha and beta"),
        (["--adapter", "dora", "--targets", "transformer.resblocks.0.attn"],
         "PEFT has no DoRA for nn.MultiheadAttention"),
        (["--adapter", "lora"], "PEFT's LoRA for nn.MultiheadAttention adds an out_proj's delta twice"),  # the default: every layer
        (["--adapter", "lora", "--targets", "out_proj"], "never called"),
        (["--adapter", "lora", "--targets", "c_fc", "--also-train", "ln_final.*"], "trained parameters besides the adapters"),
    ],
)
def test_what_peft_cannot_represent_is_refused_in_one_line(cli, world, tmp_path, args, message):
    run = _train(cli, world, tmp_path / "run", "--rank", "4", *args)
    res = cli("export", run, "--peft", tmp_path / "peft")
    assert res.exit_code == 1, res.output
    assert message in " ".join(res.output.split()) and res.output.count("error:") == 1
    assert not (tmp_path / "peft").exists()


def test_export_takes_one_of_out_and_peft_and_keeps_foreign_directories(runs, cli, tmp_path):
    assert cli("export", runs["lora"]).exit_code == 2
    assert cli("export", runs["lora"], "--out", tmp_path / "a", "--peft", tmp_path / "b").exit_code == 2
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    res = cli("export", runs["lora"], "--peft", mine)
    assert res.exit_code == 1 and "not a previous PEFT export" in res.output
    assert (mine / "notes.txt").read_text() == "keep me"
    for _ in range(2):  # a previous export is replaced
        assert cli("export", runs["lora"], "--peft", tmp_path / "exp").exit_code == 0


def test_the_reason_for_refusing_an_adapted_out_proj_still_holds():
    """PEFT's nn.MultiheadAttention LoRA adds out_proj's delta twice (huggingface/peft#3774).

    When this fails, PEFT has fixed it: let :func:`tbps.models.peft_format.peft_targets` export an
    adapted out_proj, and drop this test.
    """
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.MultiheadAttention(16, 2, batch_first=True)).eval()
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["0"], init_lora_weights=False)).eval()
    attn = peft_model.base_model.model[0]
    out_proj = attn.get_base_layer().out_proj
    plain = torch.nn.MultiheadAttention(16, 2, batch_first=True).eval()
    with torch.no_grad():
        plain.in_proj_weight.copy_(attn.get_base_layer().in_proj_weight + attn.get_delta_weight("default"))
        plain.in_proj_bias.copy_(attn.get_base_layer().in_proj_bias)
        plain.out_proj.weight.copy_(out_proj.get_base_layer().weight + out_proj.get_delta_weight("default"))
        plain.out_proj.bias.copy_(out_proj.get_base_layer().bias)
        x = torch.randn(3, 5, 16)
        wrong = (attn(x, x, x, need_weights=False)[0] - plain(x, x, x, need_weights=False)[0]).abs().max().item()
    assert wrong > 1e-3, "PEFT now applies an attention's out_proj LoRA once: the PEFT export can allow it"
