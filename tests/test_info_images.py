"""`tbps info` looks for a sample of the image files: a wrong image root is said, with where the files are."""

from __future__ import annotations

import shutil


def test_info_finds_the_sampled_images_of_a_good_dataset(synth_world, cli):
    world = synth_world(0)
    res = cli("info", world / "benchmark" / "reid_raw.json", env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    assert "found 12 of 12 sampled" in res.stdout and "warning" not in res.stderr


def test_info_warns_when_the_image_root_is_wrong_and_names_where_the_files_are(synth_world, cli, tmp_path):
    world = synth_world(0)
    data = tmp_path / "reid_raw.json"
    shutil.copy(world / "benchmark" / "reid_raw.json", data)
    shutil.copytree(world / "benchmark" / "imgs", tmp_path / "elsewhere" / "imgs")
    res = cli("info", data, env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output  # info reports; score refuses such a dataset before any work
    assert "warning: 12 of 12 sampled image files do not exist" in res.stderr
    assert str(tmp_path / "elsewhere" / "imgs") in res.stderr and res.stderr.count("\n") == 1
