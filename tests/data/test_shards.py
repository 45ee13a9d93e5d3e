"""data=shards and fcmae-shards pack: pack -> read round trip, the WebDataset layout, bit-exact resume
(CPU and GPU-decode pipelines), two ranks disjoint and covering, a corrupt member skipped and named,
fine-tuning from labelled shards, and the refusals."""
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from fcmae.data.image_io import DataError
from fcmae.data.samples import PretrainSamples
from fcmae.data.loaders import ResumableSampler
from fcmae.data.transforms import pretrain_transform
from fcmae.data.sources import scan_image_folder
from fcmae.pretrain import CONFIG_PATH
from fcmae.data.shards import ShardImages
from fcmae.data.shards_pack import main as shards_main
from fcmae.data.shards_pack import pack

from test_pretrain import assert_resume_is_bit_identical


def image_folder(root: Path, per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "dog", "emu"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = Image.fromarray(rng.integers(0, 256, (70 + 10 * c, 90, 3), dtype=np.uint8))
            img.save(root / name / (f"{i}.png" if i == 0 else f"{i}.jpg"))  # a PNG among JPEGs
    return root


def test_pack_then_read_round_trips_bytes_labels_and_classes(tmp_path, capsys):
    src = image_folder(tmp_path / "src")
    assert shards_main(["pack", str(src), str(tmp_path / "out"), "--shard-size", "40KB"]) == 0
    assert "packed 18 images of 3 classes" in capsys.readouterr().out
    shards, files = ShardImages(tmp_path / "out"), scan_image_folder(src)
    assert len(shards.shards) > 1  # the size limit split them
    assert shards.classes == files.classes == ["cat", "dog", "emu"] and shards.labels == files.labels
    for i, path in enumerate(files.paths):
        assert shards.read_bytes(i) == Path(path).read_bytes()
        assert np.array_equal(np.asarray(shards[i][0]), np.asarray(files[i][0]))
    # the WebDataset layout: <key>.<ext> + <key>.cls in plain tar files
    with tarfile.open(tmp_path / "out" / shards.shards[0]) as tar:
        names = tar.getnames()
        assert names[:2] == ["000000000.png", "000000000.cls"]
        assert tar.extractfile("000000000.cls").read() == b"0"


def test_unlabelled_folders_and_file_lists_pack_too(tmp_path):
    src = image_folder(tmp_path / "src", per_class=2)
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted(src.rglob("*.jpg")):
        (flat / f"{p.parent.name}_{p.name}").write_bytes(p.read_bytes())
    pack(flat, tmp_path / "flat_shards", log=lambda *_: None)
    assert ShardImages(tmp_path / "flat_shards").classes is None and len(ShardImages(tmp_path / "flat_shards")) == 3
    listing = tmp_path / "train.txt"
    listing.write_text("".join(f"{p.relative_to(tmp_path)} {p.parent.name}\n" for p in sorted(src.rglob("*.jpg"))))
    pack(listing, tmp_path / "list_shards", log=lambda *_: None)
    assert ShardImages(tmp_path / "list_shards").classes == ["cat", "dog", "emu"]


def test_two_ranks_read_disjoint_samples_that_cover_the_set(tmp_path):
    pack(image_folder(tmp_path / "src"), tmp_path / "out", shard_bytes=40_000, log=lambda *_: None)
    dataset = PretrainSamples(ShardImages(tmp_path / "out"), pretrain_transform(64), 64, 0.5, seed=0)
    seen = []
    for rank in (0, 1):
        sampler = ResumableSampler(dataset, num_replicas=2, rank=rank, seed=0)
        sampler.set_epoch(3)
        seen.append({dataset.source.describe(key % len(dataset)) for key in sampler})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {dataset.source.describe(i) for i in range(len(dataset))}


def test_a_corrupt_member_is_skipped_named_and_counted(tmp_path, caplog):
    pack(image_folder(tmp_path / "src"), tmp_path / "out", log=lambda *_: None)
    shards = ShardImages(tmp_path / "out")
    shard, offset, size, name, _ = shards.members[3]
    with open(tmp_path / "out" / shards.shards[shard], "r+b") as f:
        f.seek(offset + 20)
        f.write(bytes(size - 40))  # zeros over the image data, the tar structure intact
    dataset = PretrainSamples(ShardImages(tmp_path / "out"), pretrain_transform(64), 64, 0.5, seed=0)
    with caplog.at_level(logging.WARNING):
        x, _, bad, _ = dataset.read(3)
    assert bad == 1 and f"{shards.shards[shard]}:{name}" in caplog.text
    assert x.shape == (3, 64, 64)


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_pretraining_on_shards_resumes_bit_identically(tmp_path, decode):
    pack(image_folder(tmp_path / "src"), tmp_path / "out", shard_bytes=40_000, log=lambda *_: None)
    assert_resume_is_bit_identical(tmp_path, ["data=shards", f"data.root={tmp_path / 'out'}", f"data.decode={decode}",
                                              "trainer.max_steps=5", "trainer.ckpt_every=100", "data.num_workers=1"])


def test_fine_tuning_reads_labelled_shards(tmp_path):
    from fcmae.finetune import run as finetune
    pack(image_folder(tmp_path / "train"), tmp_path / "train_shards", log=lambda *_: None)
    pack(image_folder(tmp_path / "val", per_class=2), tmp_path / "val_shards", log=lambda *_: None)
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base=None):
        cfg = compose("finetune", overrides=[
            "data.source=shards", f"data.train_root={tmp_path / 'train_shards'}",
            f"data.val_root={tmp_path / 'val_shards'}", "data.img_size=64", "data.batch_size=4", "data.num_workers=0",
            "trainer.max_steps=2", "trainer.progress=log"])
    finetune(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if "val/top1" in r][-1]
    assert final["val/images"] == 6


def test_refusals_name_the_problem(tmp_path, capsys):
    src = image_folder(tmp_path / "src", per_class=1)
    pack(src, tmp_path / "out", log=lambda *_: None)
    assert shards_main(["pack", str(src), str(tmp_path / "out")]) == 2
    assert "already holds shards" in capsys.readouterr().err
    with pytest.raises(DataError, match="no index.json.*fcmae-shards pack"):
        ShardImages(src)
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.jpg").write_bytes((src / "cat" / "0.png").read_bytes())
    pack(flat, tmp_path / "flat_shards", log=lambda *_: None)
    from fcmae.data.sources import labelled_source
    with pytest.raises(DataError, match="packed without labels"):
        labelled_source("shards", str(tmp_path / "flat_shards"), "train", 0, 0, 64, 0)
    assert shards_main(["pack", str(tmp_path / "missing"), str(tmp_path / "o2")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_open_shard_handles_are_capped(tmp_path, monkeypatch):
    """Random access touches every shard; handles beyond the cap are closed, least recently used first."""
    import fcmae.data.shards as shards_module
    monkeypatch.setattr(shards_module, "MAX_OPEN", 2)
    opened, real_open = [], shards_module._open
    monkeypatch.setattr(shards_module, "_open", lambda path, mode="rb": opened.append(real_open(path, mode)) or opened[-1])
    pack(image_folder(tmp_path / "src"), tmp_path / "out", shard_bytes=20_000, log=lambda *_: None)
    shards = ShardImages(tmp_path / "out")
    assert len(shards.shards) >= 4
    files = scan_image_folder(tmp_path / "src")
    for i in [0, len(shards) - 1, 1, len(shards) // 2, 0, len(shards) - 2]:
        assert shards.read_bytes(i) == Path(files.paths[i]).read_bytes()
        assert sum(not f.closed for f in opened) <= 2
    assert len(opened) > 2  # shards were reopened after eviction, and read correctly


def test_val_shards_are_matched_to_the_training_classes_by_name(tmp_path):
    pack(image_folder(tmp_path / "src", per_class=1), tmp_path / "val", log=lambda *_: None)  # cat, dog, emu
    val = ShardImages(tmp_path / "val", classes=["ant", "cat", "dog", "emu"])
    assert val.classes == ["ant", "cat", "dog", "emu"] and val.labels == [1, 2, 3]
    with pytest.raises(DataError, match=r"has classes the training set does not: \['emu'\]"):
        ShardImages(tmp_path / "val", classes=["cat", "dog"])
