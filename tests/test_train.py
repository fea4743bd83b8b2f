"""``tbps train`` / ``tbps export``: a real few-step run of tbps-tiny on rendered pedestrians.

The world: 8 persons, each a shirt colour on a dark background, 2 training images and 1
validation image per person, captions naming the colour. Every run is fp32 on CPU, batch 8.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tbps import columns as C
from tbps.errors import UsageError
from tbps.models import load
from tbps.models.adapters import WEIGHTS_FILE, adapter_state_dict
from tbps.models.encode import encode_images, encode_texts
from tbps.models.runs import load_run
from tbps.train.checkpoint import build_model
from tbps.train.data import GlobalBatches
from tbps.train.loop import TrainConfig, freeze_scale, lr_factor, train
from tbps.train.loss import clip_loss, sdm_loss

COLOURS = {
    "red": (200, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 40, 200),
    "yellow": (220, 210, 30),
    "black": (10, 10, 10),
    "white": (240, 240, 240),
    "purple": (130, 30, 150),
    "orange": (240, 130, 20),
}
FAST = ["--model", "tbps-tiny", "--batch-size", "8", "--workers", "0", "--precision", "fp32", "--device", "cpu", "--warmup", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")

def _render(path: Path, rgb: tuple[int, int, int], rng: np.random.Generator) -> None:
    arr = np.zeros((96, 32, 3), np.uint8)
    arr[:] = rng.integers(0, 60, 3)
    arr[20:60, 6:26] = rgb
    arr[60:, 8:24] = np.array(rgb) // 2
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """manifest.parquet (16 train pairs + 1 with a missing image) and pairs.csv (train + val splits, other persons)."""
    root = tmp_path_factory.mktemp("world")
    rng = np.random.default_rng(0)
    rows = []
    for p, (name, rgb) in enumerate(COLOURS.items()):
        for k, split in enumerate(("train", "train", "val")):
            _render(root / f"p{p}_{k}.png", rgb, rng)
            # Validation persons are other people in the same colours: the splits share no person.
            person = str(p) if split == "train" else str(p + len(COLOURS))
            rows.append({C.PAIR_ID: f"{p}-{k}", C.IMAGE_PATH: f"p{p}_{k}.png", C.CAPTION: f"a person wearing a {name} shirt",
                         C.PERSON_ID: person, C.SPLIT: split})
    table = pl.DataFrame(rows)
    table.write_csv(root / "pairs.csv")
    manifest = table.filter(pl.col(C.SPLIT) == "train").drop(C.SPLIT)
    missing = {C.PAIR_ID: "gone", C.IMAGE_PATH: "gone.png", C.CAPTION: "a person wearing a grey shirt", C.PERSON_ID: "9"}
    pl.concat([manifest, pl.DataFrame([missing])]).write_parquet(root / "manifest.parquet")
    return root


@pytest.fixture(scope="module")
def run_dir(world, tmp_path_factory, cli) -> Path:
    """A 4-step wora run through the CLI with validation (1 of 17 manifest images missing)."""
    run = tmp_path_factory.mktemp("runs") / "wora"
    res = cli("train", "--manifest", world / "manifest.parquet", "--val", world / "pairs.csv", "--out", run, *FAST,
                  "--steps", "4", "--val-every", "2", "--lr", "1e-3", "--log-every", "1", "--max-missing", "0.1", "--quiet")
    assert res.exit_code == 0, res.output
    assert "skipped missing-image" in res.output
    return run


def test_cli_run_writes_a_complete_run_directory(run_dir, tiny_clip):
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "complete" and record["step"] == 4
    assert record["config"]["adapter"] == "wora" and record["config"]["steps"] == 4
    assert record["base_model"]["identity"] == tiny_clip.identity
    assert record["adapter"]["method"] == "wora" and record["adapter"]["modules"]
    assert record["data"]["kind"] == "manifest" and len(record["data"]["sha"]) == 32
    assert record["data"]["rows"] == 17 and record["data"]["used"] == 16 and record["data"]["skipped"] == {"missing-image": 1}
    params = record["parameters"]
    assert 0 < params["trainable"] < 0.05 * params["total"]
    assert record["training"]["pairs_seen"] == 4 * 8 and record["training"]["train_seconds"] > 0
    assert record["result_checkpoint"] == "best" and record["best"]["step"] in (2, 4)
    assert set(record["best"]["metrics"]) == {"R1", "R5", "R10", "mAP", "mINP"}
    assert record["versions"]["torch"] and "git_commit" in record
    lines = [json.loads(ln) for ln in (run_dir / "log.jsonl").read_text().splitlines()]
    train_lines = [ln for ln in lines if ln["kind"] == "train"]
    assert [ln["step"] for ln in train_lines] == [1, 2, 3, 4]
    assert all({"epoch", "loss", "lr", "img_per_s", "wall_s"} <= set(ln) for ln in train_lines)
    assert [ln["step"] for ln in lines if ln["kind"] == "val"] == [2, 4]
    for name in ("adapter_config.json", WEIGHTS_FILE, "trainer.pt"):
        assert (run_dir / "last" / name).is_file()
    assert (run_dir / "best" / WEIGHTS_FILE).is_file() and not (run_dir / "best" / "trainer.pt").exists()


def test_only_adapter_parameters_and_temperature_changed(run_dir):
    trained = load_run(run_dir, "last").model
    start = build_model("tbps-tiny", 0, "wora", 8, None, "per-input").model
    adapted = set(adapter_state_dict(start))
    assert "logit_scale" in adapted and any(n.endswith("lora_B") for n in adapted)
    after = dict(trained.named_parameters())
    changed = {n for n, p in start.named_parameters() if not torch.equal(p, after[n])}
    assert changed and changed <= adapted
    assert any(n.endswith("lora_B") for n in changed)


def test_export_merge_gives_the_run_model(run_dir, world, tmp_path, cli, tiny_clip):
    res = cli("export", run_dir, "--merge", "--out", tmp_path / "wora.pt")
    assert res.exit_code == 0, res.output
    from_run, exported = load(str(run_dir)), load(str(tmp_path / "wora.pt"))
    assert from_run.identity["run"] == "wora" and from_run.identity["checkpoint"] == "best"
    assert len(from_run.identity["sha"]) == 32 and from_run.identity["base"]["spec"] == "tbps-tiny"
    paths = [str(p) for p in sorted(world.glob("p*_2.png"))]
    captions = [f"a person wearing a {c} shirt" for c in COLOURS]
    for fn, items in ((encode_images, paths), (encode_texts, captions)):
        a, b = fn(from_run, items, batch_size=8), fn(exported, items, batch_size=8)
        a, b = getattr(a, "embeddings", a), getattr(b, "embeddings", b)
        assert np.abs(a - b).max() <= 1e-5
    assert not np.allclose(encode_texts(tiny_clip, captions), encode_texts(exported, captions), atol=1e-4)


def test_export_no_merge_writes_the_adapters_alone_and_they_load_like_the_run(run_dir, world, tmp_path, cli):
    res = cli("export", run_dir, "--no-merge", "--out", tmp_path / "adapters")
    assert res.exit_code == 0, res.output
    out = tmp_path / "adapters"
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["adapter_config.json", WEIGHTS_FILE, "run.json"]
    from_run, exported = load(str(run_dir)), load(str(out))
    assert exported.identity["sha"] == from_run.identity["sha"] and exported.identity["checkpoint"] == "best"
    captions = [f"a person wearing a {c} shirt" for c in COLOURS]
    assert np.array_equal(encode_texts(from_run, captions), encode_texts(exported, captions))


def test_sdm_treats_pairs_of_one_person_as_positives():
    # Two pairs of one person with identical embeddings, a third person orthogonal to them.
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    scale = torch.tensor(50.0)
    same_person = sdm_loss(emb, emb, torch.tensor([7, 7, 3]), scale)
    assert same_person.item() == pytest.approx(0.0, abs=1e-6)  # prediction = target (1/2, 1/2, 0)
    distinct = sdm_loss(emb, emb, torch.tensor([1, 2, 3]), scale)
    assert distinct.item() > 0.5  # pair 0 cannot tell its caption from pair 1's
    # InfoNCE has one positive per row: rows 0 and 1 split their mass, -log(1/2) each, both directions.
    assert clip_loss(emb, emb, scale).item() == pytest.approx(2 / 3 * np.log(2), abs=1e-6)


def test_batches_shard_the_single_process_order_and_cover_each_epoch():
    one = list(GlobalBatches(10, 4, seed=3, start=0, stop=6))
    ranks = [list(GlobalBatches(10, 4, seed=3, start=0, stop=6, rank=r, world=2)) for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks)] == one
    epoch0 = [i for e, i in sum(one[:2], [])]
    assert len(set(epoch0)) == 8 and {e for e, _ in sum(one[2:4], [])} == {1}  # 2 blocks of 4 per epoch
    assert list(GlobalBatches(10, 4, seed=3, start=3, stop=6)) == one[3:]  # resume at micro-batch 3


def test_lr_warms_up_then_decays_to_zero():
    factors = [lr_factor(s, warmup=3, total=10) for s in range(10)]
    assert factors[:3] == pytest.approx([0.25, 0.5, 0.75]) and factors[3] == 1.0
    assert all(a > b for a, b in zip(factors[3:], factors[4:])) and lr_factor(10, 3, 10) == 0.0


def _config(world: Path, out: Path, **kw) -> TrainConfig:
    base = dict(out=str(out), model="tbps-tiny", manifest=str(world / "manifest.parquet"), max_missing=0.1, batch_size=8,
                workers=0, precision="fp32", device="cpu", warmup=1, log_every=1)
    return TrainConfig(**{**base, **kw})


def _losses(run: Path) -> list[float]:
    return [ln["loss"] for ln in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if ln["kind"] == "train"]


def test_loss_decreases_on_a_repeated_batch(world, tmp_path):
    pl.read_parquet(world / "manifest.parquet").filter(pl.col(C.PAIR_ID).str.ends_with("-0")).with_columns(
        (str(world) + "/" + pl.col(C.IMAGE_PATH)).alias(C.IMAGE_PATH)
    ).write_parquet(tmp_path / "eight.parquet")
    result = train(_config(world, tmp_path / "run", manifest=str(tmp_path / "eight.parquet"), steps=8, lr=3e-3))
    losses = _losses(tmp_path / "run")
    assert len(losses) == 8 and result.final_loss == pytest.approx(losses[-1])
    assert losses[-1] < 0.8 * losses[0], losses


class _Crash(Exception):
    pass


def test_resume_equals_an_uninterrupted_run(world, tmp_path):
    kw = dict(steps=4, save_every=2, batch_size=4, accum=2, loss="sdm", lr=2e-3)
    train(_config(world, tmp_path / "straight", **kw))

    def crash_at_3(step: int, total: int) -> None:
        if step == 3:
            raise _Crash  # killed after step 3: RUN/last holds step 2

    with pytest.raises(_Crash):
        train(_config(world, tmp_path / "resumed", **kw), progress=crash_at_3)
    assert torch.load(tmp_path / "resumed" / "last" / "trainer.pt", weights_only=True)["step"] == 2
    train(_config(world, tmp_path / "resumed", resume=True, **kw))
    a, b = (load_file(tmp_path / r / "last" / WEIGHTS_FILE) for r in ("straight", "resumed"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    assert _losses(tmp_path / "resumed") == pytest.approx(_losses(tmp_path / "straight"), abs=1e-6)


def _names_run_state(path: Path) -> bool:
    return not (path / "last").exists() and not (path / "log.jsonl").exists()


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--manifest", "{w}/nope.parquet"], 1, "manifest not found"),
        (["--manifest", "{w}/noid.parquet"], 1, "lacks column(s) person_id; expected at least pair_id, image_path, caption, person_id, found"),
        (["--manifest", "{w}/manifest.parquet", "--max-missing", "0.01"], 1, "1 of 17 rows (5.9%) have a missing or empty image"),
        (["--manifest", "{w}/manifest.parquet", "--rank", "500"], 2, "rank 500 is larger than layer"),
        (["--manifest", "{w}/manifest.parquet", "--adapter", "bora"], 2, "--adapter must be one of"),
        (["--manifest", "{w}/manifest.parquet", "--targets", "nowhere"], 1, "target pattern matches no Linear"),
        (["--manifest", "{w}/manifest.parquet", "--also-train", "nowhere.*"], 1, "extra_trainable pattern matches no parameter"),
        (["--manifest", "{w}/manifest.parquet", "--adapter", "lora", "--lora-alpha", "-1"], 2, "lora_alpha"),
        (["--manifest", "{w}/manifest.parquet", "--adapter", "dora", "--fixed-scale"], 2, "(found 'dora')"),
        (["--manifest", "{w}/manifest.parquet", "--data", "{w}/pairs.csv"], 2, "exactly one of --manifest and --data"),
        (["--data", "{w}/pairs.csv", "--train-split", "dev"], 1, "split 'dev' not found"),
        (["--manifest", "{w}/manifest.parquet", "--resume"], 1, "cannot resume: not a run directory"),
        (["--manifest", "{w}/manifest.parquet", "--device", "gpu"], 2, "--device must be auto, cpu, cuda or cuda:N"),
    ],
)
def test_bad_input_is_refused_before_training(world, tmp_path, args, code, message, cli):
    pl.read_parquet(world / "manifest.parquet").drop(C.PERSON_ID).write_parquet(world / "noid.parquet")
    out = tmp_path / "run"
    # The case's options come last: where an option repeats, the last one counts.
    res = cli("train", "--max-missing", "0.1", "--out", out, *FAST, "--steps", "2", *[a.format(w=world) for a in args])
    assert res.exit_code == code, res.output
    assert message in " ".join(res.output.split()), res.output
    assert _names_run_state(out)


def test_unusable_resume_checkpoint_is_refused(run_dir, world, tmp_path, cli):
    args = ["train", "--manifest", world / "manifest.parquet", "--val", world / "pairs.csv", *FAST, "--steps", "4",
            "--val-every", "2", "--lr", "1e-3", "--max-missing", "0.1", "--quiet"]
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    res = cli(*args, "--out", copy)
    assert res.exit_code == 1 and "not empty" in res.output and "--resume" in res.output
    res = cli(*args, "--out", copy, "--resume", "--rank", "4")
    assert res.exit_code == 1 and "rank: run has 8, now 4" in " ".join(res.output.split()), res.output
    (copy / "last" / "trainer.pt").unlink()
    res = cli(*args, "--out", copy, "--resume")
    assert res.exit_code == 1 and "last checkpoint is incomplete" in " ".join(res.output.split()), res.output


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(world, tmp_path):
    args = ["--data", world / "pairs.csv", "--out", tmp_path / "ddp", *FAST, "--steps", "3", "--lr", "1e-3", "--loss", "sdm",
            "--log-every", "1", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "tbps", "train"]
    proc = subprocess.run(cmd + [str(a) for a in args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert record["world_size"] == 2 and record["status"] == "complete"
    single = TrainConfig(out=str(tmp_path / "one"), model="tbps-tiny", data=str(world / "pairs.csv"), batch_size=8, workers=0,
                         precision="fp32", device="cpu", warmup=1, steps=3, lr=1e-3, loss="sdm", log_every=1)
    train(single)
    assert _losses(tmp_path / "ddp") == pytest.approx(_losses(tmp_path / "one"), abs=1e-5)
    a, b = (load_file(tmp_path / r / "last" / WEIGHTS_FILE) for r in ("ddp", "one"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5)


def test_fixed_scale_freezes_alpha_and_beta_and_also_train_adds_parameters(tmp_path):
    loaded = build_model("tbps-tiny", 0, "wora", 8, None, "per-input", also_train=["ln_final.*"])
    trainable = {n for n, p in loaded.model.named_parameters() if p.requires_grad}
    assert {"ln_final.weight", "ln_final.bias", "logit_scale"} <= trainable
    assert any(n.endswith("wora_alpha") for n in trainable)
    assert freeze_scale(loaded.model) > 0
    assert not any(n.endswith(("wora_alpha", "wora_beta")) for n, p in loaded.model.named_parameters() if p.requires_grad)
    with pytest.raises(UsageError, match="--fixed-scale applies to --adapter wora"):
        TrainConfig(out=str(tmp_path / "r"), model="tbps-tiny", data="x", adapter="lora", fixed_scale=True)
    with pytest.raises(UsageError, match="--lora-alpha applies"):
        TrainConfig(out=str(tmp_path / "r"), model="tbps-tiny", data="x", adapter="wora", lora_alpha=64.0)
    with pytest.raises(UsageError, match="--also-train applies"):
        TrainConfig(out=str(tmp_path / "r"), model="tbps-tiny", data="x", adapter="full", also_train=["ln_*"])


def test_a_run_killed_before_its_first_checkpoint_starts_afresh(world, tmp_path, cli):
    from tbps.train.checkpoint import recover, truncate_log

    args = ["train", "--manifest", world / "manifest.parquet", *FAST, "--steps", "2", "--max-missing", "0.1", "--quiet"]
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text('{"status": "running"}')
    (run / "log.jsonl").write_text('{"kind": "train", "step": 1}\n{"kind": "tr')  # torn by the kill
    (run / ".last.99999999.abcd1234.tbps-tmp").mkdir()  # a checkpoint half written by a dead process
    for extra in ([], ["--resume"]):  # a plain re-run and --resume both start the run afresh
        res = cli(*args, "--out", run, *extra)
        assert res.exit_code == 0, res.output
        assert json.loads((run / "run.json").read_text())["status"] == "complete"
        assert not [p for p in run.iterdir() if p.name.endswith(".tbps-tmp")]
        (run / "last").rename(run / "gone")
        shutil.rmtree(run / "gone")
        (run / "run.json").write_text('{"status": "running"}')
        for name in ("best",):
            shutil.rmtree(run / name, ignore_errors=True)
    # A torn last log line is dropped, not a traceback.
    (run / "log.jsonl").write_text('{"kind": "train", "step": 1}\n{"kind": "train", "step": 3}\n{"ki')
    truncate_log(run, 2)
    assert (run / "log.jsonl").read_text() == '{"kind": "train", "step": 1}\n'
    # Files tbps did not write are never removed.
    (run / "notes.txt").write_text("mine")
    assert recover(run) == "foreign" and (run / "notes.txt").is_file()


@pytest.mark.parametrize(("warmup", "total", "steps"), [(0.05, 20, 1), (0.05, 1000, 50), (100, 20, 20), (3, 20, 3), (0, 20, 0)])
def test_warmup_is_a_share_of_the_run_or_a_step_count_at_most_the_run(warmup, total, steps):
    from tbps.train.loop import warmup_steps

    assert warmup_steps(warmup, total) == steps
    # The default share reaches the peak learning rate within the run.
    if warmup == 0.05:
        assert max(lr_factor(s, steps, total) for s in range(total)) == 1.0


def test_a_warmup_covering_most_of_the_run_is_warned(world, tmp_path, cli):
    args = ["train", "--manifest", world / "manifest.parquet", *FAST, "--steps", "4", "--max-missing", "0.1"]
    res = cli(*args, "--warmup", "100", "--out", tmp_path / "r")  # where an option repeats, the last one counts
    assert res.exit_code == 0, res.output
    assert "warm-up covers 4 of the run's 4 steps" in " ".join(res.output.split())
    with pytest.raises(UsageError, match="whole number of steps"):
        TrainConfig(out=str(tmp_path / "x"), model="tbps-tiny", data="x", warmup=2.5)


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_a_run_directory_is_a_base_model_its_adapters_folded_in(run_dir, world, tmp_path, cli, adapter):
    out = tmp_path / f"on-{adapter}"
    res = cli("train", "--manifest", world / "manifest.parquet", "--model", run_dir, *FAST[2:], "--steps", "2", "--adapter", adapter,
              "--max-missing", "0.1", "--out", out, "--quiet")
    assert res.exit_code == 0, res.output
    record = json.loads((out / "run.json").read_text())
    assert record["base_model"]["spec"] == str(run_dir) and record["status"] == "complete"
    res = cli("train", "--manifest", world / "manifest.parquet", "--model", run_dir, *FAST[2:], "--steps", "2", "--adapter", adapter,
              "--max-missing", "0.1", "--out", out, "--resume", "--quiet")
    assert res.exit_code == 0, res.output
    # The run trained on a run loads (score, eval, search, export): its base's adapters are folded in first.
    loaded = load(str(out))
    assert loaded.identity["base"]["run"] == "wora" and loaded.identity["adapter"] == adapter
    res = cli("export", out, "--merge", "--out", tmp_path / f"{adapter}.pt")
    assert res.exit_code == 0, res.output


def test_validating_on_the_test_split_needs_allow_test(tmp_path):
    with pytest.raises(UsageError, match="--val-split test would choose the checkpoint on the test split"):
        TrainConfig(out=str(tmp_path / "r"), model="tbps-tiny", data="x", val="v", val_split="test")
    assert TrainConfig(out=str(tmp_path / "r"), model="tbps-tiny", data="x", val="v", val_split="test", allow_test=True).allow_test


def test_run_files_respect_the_umask(run_dir):
    mask = os.umask(0)
    os.umask(mask)
    for path in run_dir.rglob("*"):
        expected = (0o777 if path.is_dir() else 0o666) & ~mask
        assert (path.stat().st_mode & 0o777) == expected, path


def test_export_no_merge_refuses_to_replace_a_directory_it_did_not_write(run_dir, tmp_path, cli):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    res = cli("export", run_dir, "--no-merge", "--out", mine)
    assert res.exit_code == 1 and "not a previous adapter export" in res.output
    assert (mine / "notes.txt").read_text() == "keep me"
    res = cli("export", run_dir, "--no-merge", "--out", run_dir)
    assert res.exit_code == 1 and (run_dir / "last" / "trainer.pt").is_file()
    for _ in range(2):  # a previous export is replaced
        assert cli("export", run_dir, "--no-merge", "--out", tmp_path / "exp").exit_code == 0


def test_a_run_with_only_a_first_best_restarts_and_a_live_writer_is_refused(world, tmp_path, cli):
    import platform

    from tbps.train.checkpoint import recover

    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    (run / "best" / "adapter_config.json").write_text("{}")
    (run / "run.json").write_text(json.dumps({"status": "running", "pid": 99999999, "host": platform.node()}))
    assert recover(run) == "restarted" and not any(run.iterdir())
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / "run.json").write_text(json.dumps({"status": "running", "pid": other.pid, "host": platform.node()}))
        assert recover(run) == "busy" and (run / "run.json").is_file()
        res = cli("train", "--manifest", world / "manifest.parquet", *FAST, "--steps", "2", "--max-missing", "0.1", "--out", run)
        assert res.exit_code == 1 and "another tbps train is writing" in " ".join(res.output.split())
    finally:
        other.kill()
        other.wait()


def test_manifest_paths_outside_the_image_root_are_skipped_and_never_read(world, tmp_path, cli):
    scores, manifest = tmp_path / "scores", tmp_path / "m.parquet"
    res = cli("score", world / "pairs.csv", "--split", "train", "--model", "tbps-tiny", "--bank", world / "pairs.csv", "--out", scores,
              "--workers", "0", "--precision", "fp32", "--device", "cpu", "--bank-size", "8", "-q")
    assert res.exit_code == 0, res.output
    assert cli("select", scores, "--dedup", "none", "--out", manifest, "-q").exit_code == 0
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copyfile(world / "p0_0.png", outside / "stolen.png")
    rows = pl.read_parquet(manifest)
    extra = rows.head(2).with_columns(pl.Series(C.PAIR_ID, ["abs", "rel"]),
                                      pl.Series(C.IMAGE_PATH, [str(outside / "stolen.png"), "../outside/stolen.png"]))
    pl.concat([rows, extra]).write_parquet(manifest)  # the sidecar still names the score run and its image root

    run = tmp_path / "run"
    res = cli("train", "--manifest", manifest, "--out", run, *FAST, "--steps", "2", "--max-missing", "0.1", "--quiet")
    assert res.exit_code == 0, res.output
    data = json.loads((run / "run.json").read_text())["data"]
    assert data["rows"] == 18 and data["used"] == 16 and data["skipped"] == {C.STATUS_PATH_OUTSIDE_ROOT: 2}
    assert data["image_roots"] == [os.path.realpath(world)] and len(data["outside_examples"]) == 2
    assert any("is outside the image root" in e for e in data["outside_examples"])
    # An explicit --image-root that holds the file accepts the absolute path (the relative one then resolves inside it).
    res = cli("train", "--manifest", manifest, "--image-root", outside, "--out", tmp_path / "run2", *FAST, "--steps", "1",
              "--max-missing", "0.1", "--quiet")
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "run2" / "run.json").read_text())["data"]
    assert data["image_roots"] == [os.path.realpath(outside), os.path.realpath(world)] and data["used"] == 18


def _copy_world(world: Path, to: Path) -> Path:
    shutil.copytree(world, to)
    rows = pl.read_parquet(to / "manifest.parquet").filter(pl.col(C.PAIR_ID) != "gone")
    rows.write_parquet(to / "manifest.parquet")
    return to


def test_a_manifest_image_overwritten_with_text_is_replaced_and_counted(world, tmp_path, cli):
    copy = _copy_world(world, tmp_path / "w")
    (copy / "p3_1.png").write_text("not an image any more")
    run = tmp_path / "run"
    res = cli("train", "--manifest", copy / "manifest.parquet", "--out", run, *FAST, "--steps", "2")
    assert res.exit_code == 0, res.output
    training = json.loads((run / "run.json").read_text())["training"]
    assert training["images_replaced"] == 1 and training["undecodable_examples"] == [str(copy / "p3_1.png")]
    assert f"warning: training image {copy / 'p3_1.png'} does not decode" in " ".join(res.output.split())


@pytest.mark.slow
def test_a_run_of_undecodable_images_in_a_worker_is_one_line_and_the_run_restarts(world, tmp_path, cli):
    copy = _copy_world(world, tmp_path / "w")
    saved = {p: p.read_bytes() for p in copy.glob("p*_[01].png")}
    for path in saved:
        path.write_text("text")
    run = tmp_path / "run"
    args = ("train", "--manifest", copy / "manifest.parquet", "--out", run, *FAST, "--steps", "2", "--workers", "1")
    res = cli(*args)
    assert res.exit_code == 1 and "Traceback" not in res.output and "DataLoader worker" not in res.output, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "16 consecutive training images cannot be decoded" in " ".join(res.output.split())
    assert json.loads((run / "run.json").read_text())["status"] == "failed"
    for path, data in saved.items():
        path.write_bytes(data)
    res = cli(*args)  # the failed run held no checkpoint: it starts afresh
    assert res.exit_code == 0, res.output
