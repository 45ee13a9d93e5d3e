"""data.decode=gpu (fcmae/data/device_decode.py) on the CPU: workers read bytes and draw the crop, the main
process decodes the batch. Checked against the CPU pipeline (fcmae/data/samples.py) sample by sample: the
same crop geometry on real JPEGs, the per-sample fallback, a corrupt JPEG, exact resume."""
import io
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torch.utils._python_dispatch import TorchDispatchMode

from fcmae.storage.checkpoint import load_checkpoint
from fcmae.config import ConfigError
from fcmae.data.image_io import DataError
from fcmae.data.samples import PretrainSamples, seeded_rngs
from fcmae.data.transforms import pretrain_transform
from fcmae.data.sources import scan_folder
from fcmae.data.device_decode import EncodedPretrainSamples, collate_encoded, read_jpeg, resolve_decode
from fcmae.data.device_decoder import DeviceDecoder
from fcmae.pretrain import run
from fcmae.data.loaders import build_pretrain_loader

from test_pretrain import assert_resume_is_bit_identical, make_cfg

SIZE = 64
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
try:
    import torchcodec  # noqa: F401  (the 'gpu' extra; CI installs it)
    DECODERS = ["torchvision", "torchcodec"]
except ImportError:
    DECODERS = ["torchvision"]
# (decoder, device): the device path itself where a GPU is present (benchmarks/gpu_check.sh)
DECODE_ON = [(d, "cpu") for d in DECODERS] + ([(d, "cuda") for d in DECODERS] if torch.cuda.is_available() else [])


def photo(h: int, w: int, seed: int) -> Image.Image:
    """Smooth colour noise with some edges: JPEG-compressible, every crop looks different."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (max(h // 16, 2), max(w // 16, 2), 3), dtype=np.uint8))
    img = np.asarray(small.resize((w, h), Image.BICUBIC)).copy()
    img[h // 3: h // 2, w // 5: w // 2] = rng.integers(0, 256, 3)
    return Image.fromarray(img)


def jpeg_folder(folder: Path, sizes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (h, w) in enumerate(sizes):
        photo(h, w, i).save(folder / f"{i:03d}.jpg", quality=92)
    return folder


def both_paths(folder: Path, scale=(0.2, 1.0), hflip=True, seed=3, decoder="auto", device="cpu", resize="auto"):
    source = scan_folder(folder)
    transform = pretrain_transform(SIZE, scale, hflip, MEAN, STD)
    cpu = PretrainSamples(source, transform, SIZE, 0.5, seed)
    enc = EncodedPretrainSamples(source, transform, SIZE, 0.5, scale, hflip, seed)
    return cpu, enc, DeviceDecoder(enc, SIZE, MEAN, STD, torch.device(device), decoder, resize)


def decode_keys(enc, decoder, keys):
    images, masks, bad, batch_keys, _ = collate_encoded([enc[k] for k in keys])
    imgs, extra_bad = decoder(images, batch_keys)
    return imgs.cpu(), masks, bad.sum().item() + extra_bad


@pytest.mark.parametrize("resize", ["auto", "batched"])  # on a CPU device auto resizes per image
@pytest.mark.parametrize("decoder,device", DECODE_ON)
def test_both_paths_crop_the_same_region_of_real_jpegs(tmp_path, decoder, device, resize):
    folder = jpeg_folder(tmp_path / "imgs", [(375, 500), (500, 375), (96, 96), (120, 300), (64, 200), (333, 222)])
    cpu, enc, decoder = both_paths(folder, decoder=decoder, device=device, resize=resize)
    keys = list(range(6 * 4))  # four epochs of each image: different crops and flips
    gpu_imgs, gpu_masks, bad = decode_keys(enc, decoder, keys)
    assert bad == 0
    cpu_imgs = torch.stack([cpu[k][0] for k in keys])
    assert torch.equal(gpu_masks, torch.stack([cpu[k][1] for k in keys]))
    # Pixels differ only by the resize implementations (PIL vs torch, both bicubic antialiased):
    # well under one 8-bit level on average (0.0175 in normalised units is one level).
    diff = (gpu_imgs - cpu_imgs).abs().mean(dim=(1, 2, 3))
    assert diff.max() < 0.02, diff
    # ... while the wrong geometry (the mirror image) is far off: the check above can fail.
    assert ((gpu_imgs.flip(-1) - cpu_imgs).abs().mean(dim=(1, 2, 3)) > 0.1).all()


def test_geometry_follows_the_seed_not_the_path(tmp_path):
    """The crop and flip come from the per-sample seed alone: what torchvision's own
    RandomResizedCrop + RandomHorizontalFlip draw under that seed."""
    folder = jpeg_folder(tmp_path / "imgs", [(375, 500), (200, 210)])
    _, enc, _ = both_paths(folder, scale=(0.08, 1.0))
    from fcmae.data.samples import sample_seed
    for key in range(8):
        _, geometry, *_ = enc[key]
        epoch, index = divmod(key, 2)
        with Image.open(folder / f"{index:03d}.jpg") as img:
            with seeded_rngs(sample_seed(enc.seed, epoch, index)):
                expected = [*transforms.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]),
                            int(torch.rand(1) < 0.5)]
        assert geometry.tolist() == expected


def test_what_the_device_decoder_cannot_take_is_decoded_by_the_worker(tmp_path):
    folder = jpeg_folder(tmp_path / "imgs", [(100, 150)])
    photo(90, 140, 1).save(folder / "b.png")
    photo(90, 140, 2).convert("L").save(folder / "c_grey.jpg", quality=92)
    photo(90, 140, 3).convert("CMYK").save(folder / "d_cmyk.jpg", quality=92)
    rotated = photo(80, 160, 4)  # stored landscape, shown portrait
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(folder / "e_rotated.jpg", quality=92, exif=exif)
    cpu, enc, decoder = both_paths(folder)
    names = [Path(p).name for p in enc.source.paths]
    assert read_jpeg(folder / "000.jpg") is not None
    for name in ("b.png", "c_grey.jpg", "d_cmyk.jpg", "e_rotated.jpg"):
        assert read_jpeg(folder / name) is None, name
    keys = list(range(len(names)))
    gpu_imgs, _, bad = decode_keys(enc, decoder, keys)
    assert bad == 0
    for k, name in zip(keys, names):
        if name != "000.jpg":  # the fallback is the CPU path itself: bit-identical
            assert torch.equal(gpu_imgs[k], cpu[k][0]), name


@pytest.mark.parametrize("decoder,device", DECODE_ON)
def test_a_corrupt_jpeg_is_skipped_named_and_counted_like_on_the_cpu_path(tmp_path, caplog, decoder, device):
    folder = jpeg_folder(tmp_path / "imgs", [(120, 160), (120, 160), (120, 160)])
    data = (folder / "001.jpg").read_bytes()
    (folder / "001.jpg").write_bytes(data[:600] + bytes(len(data) - 600))  # a good header, broken data
    assert read_jpeg(folder / "001.jpg") is not None  # the worker cannot tell: the decoder finds out
    with pytest.raises(OSError):  # libjpeg's verdict (through PIL): corrupt. On CUDA, nvJPEG must agree:
        with Image.open(folder / "001.jpg") as img:  # a garbage decode passed as good would give bad == 0
            img.load()
    cpu, enc, decoder = both_paths(folder, decoder=decoder, device=device)
    with caplog.at_level(logging.WARNING, logger="fcmae"):
        gpu_imgs, _, bad = decode_keys(enc, decoder, [0, 1, 2])
    assert bad == 1
    assert "001.jpg" in caplog.text
    # the stand-in is what the CPU path gives for that key: the next file, under key 1's seed
    x_cpu, _, bad_cpu, _ = cpu.read(1)
    assert bad_cpu == 1 and torch.equal(gpu_imgs[1], x_cpu)


def test_decode_choice(tmp_path):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_decode("auto", "imagefolder", cpu) == "cpu"
    assert resolve_decode("auto", "imagefolder", cuda) == "gpu"
    assert resolve_decode("auto", "synthetic", cuda) == "cpu"
    assert resolve_decode("cpu", "folder", cuda) == "cpu"
    with pytest.raises(DataError, match="data.decode=cpu"):
        resolve_decode("gpu", "synthetic", cuda)
    with pytest.raises(ConfigError, match="data.decode='nvjpeg'; use auto, cpu or gpu"):
        run(make_cfg("data.decode=nvjpeg"), tmp_path)


def test_the_gpu_decode_loader_batches_like_the_cpu_loader(tmp_path):
    folder = jpeg_folder(tmp_path / "imgs", [(150, 200)] * 8)
    cfg = SimpleNamespace(source="folder", root=str(folder), img_size=SIZE, batch_size=4, num_workers=2,
                          pin_memory=False, persistent_workers=False, crop_scale=[0.2, 1.0], hflip=True, mean=MEAN,
                          std=STD, synthetic_images=0, synthetic_classes=0, max_bad_fraction=0.01)
    loader_cpu, _, _ = build_pretrain_loader(SimpleNamespace(**vars(cfg), decode="cpu"), 0.5, seed=1)
    loader_gpu, _, _ = build_pretrain_loader(SimpleNamespace(**vars(cfg), decode="gpu"), 0.5, seed=1)
    batches = list(zip(loader_cpu, loader_gpu))
    assert len(batches) == 2
    for a, b in batches:
        assert a[0].shape == b[0].shape and a[0].dtype == b[0].dtype
        assert torch.equal(a[1], b[1]) and torch.equal(a[3], b[3]) and a[4] == b[4]
        assert (a[0] - b[0]).abs().mean() < 0.02


def test_decode_gpu_run_resumes_bit_identically(tmp_path):
    folder = jpeg_folder(tmp_path / "imgs", [(150, 200), (200, 150), (128, 128), (300, 180)] * 4)
    photo(100, 100, 9).save(folder / "z.png")  # one per-sample fallback in the mix
    assert_resume_is_bit_identical(tmp_path, ["data.source=folder", f"data.root={folder}", "data.decode=gpu",
                                              "trainer.max_steps=6", "trainer.ckpt_every=100", "data.num_workers=1"])
    assert load_checkpoint(tmp_path / "interrupted/checkpoints/last.pt")["step"] == 6


def test_a_device_that_cannot_decode_falls_back_under_auto_and_fails_clearly_under_gpu(tmp_path, monkeypatch,
                                                                                      caplog):
    import fcmae.data.device_decode as gpu_decode
    from fcmae.data.decode_ahead import DeviceBatches
    from fcmae.data.device_decode import device_decode_error
    assert device_decode_error(torch.device("cpu")) is None  # the self-test passes where decoding works
    monkeypatch.setattr(gpu_decode, "device_decode_error", lambda device, decoder="auto": "no nvJPEG in this build")
    folder = jpeg_folder(tmp_path / "imgs", [(150, 200)] * 8)
    cfg = SimpleNamespace(source="folder", root=str(folder), img_size=SIZE, batch_size=4, num_workers=0,
                          pin_memory=False, persistent_workers=False, crop_scale=[0.2, 1.0], hflip=True, mean=MEAN,
                          std=STD, synthetic_images=0, synthetic_classes=0, max_bad_fraction=0.01)
    with caplog.at_level(logging.WARNING):
        loader, _, _ = build_pretrain_loader(SimpleNamespace(**vars(cfg), decode="auto"), 0.5, seed=1,
                                             device=torch.device("cuda"))
    assert not isinstance(loader, DeviceBatches) and "no nvJPEG in this build" in caplog.text
    with pytest.raises(DataError, match="cannot decode JPEGs .*no nvJPEG.*data.decode=cpu"):
        build_pretrain_loader(SimpleNamespace(**vars(cfg), decode="gpu"), 0.5, seed=1, device=torch.device("cuda"))


@pytest.mark.slow
def test_a_large_batch_under_a_low_open_file_limit_finishes_without_bad_images(tmp_path):
    """#30 item 1: each batch's JPEG bytes travel as one tensor (one file descriptor), not one per image."""
    import subprocess
    import sys
    from pathlib import Path
    root = tmp_path / "jpegs"
    root.mkdir()
    for i in range(256):
        Image.new("RGB", (48, 40), (i % 256, 40, 90)).save(root / f"{i:04d}.jpg", "JPEG")
    code = ("import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))\n"
            "from fcmae.pretrain import main\n"
            "sys.argv = ['fcmae-pretrain'] + sys.argv[1:]\n"
            "main()\n")
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", code, "data=folder", f"data.root={root}", "data.decode=gpu",
                           "trainer.device=cpu", "data.img_size=64", "data.batch_size=256", "data.num_workers=2",
                           "model.decoder_embed_dim=32", "trainer.max_steps=2", "trainer.log_every=1",
                           "trainer.epochs=2", f"hydra.run.dir={run_dir}"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    import json
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and records[-1]["bad_images"] == 0
    assert "Too many open files" not in proc.stdout + proc.stderr


def test_a_bad_jpeg_costs_a_few_batched_calls_not_one_per_image(tmp_path):
    """#30 item 4: a failed batched decode is bisected."""
    calls = []
    good = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(good, "JPEG")
    good = torch.frombuffer(bytearray(good.getvalue()), dtype=torch.uint8)
    bad = torch.frombuffer(bytearray(b"\xff\xd8 not a jpeg"), dtype=torch.uint8)
    decoder = DeviceDecoder.__new__(DeviceDecoder)
    decoder.device, decoder.decoder_name, decoder._fallback = torch.device("cpu"), "torchvision", None

    def decode(data, device):
        batch = data if isinstance(data, list) else [data]
        calls.append(len(batch))
        if any(d is bad for d in batch):
            raise RuntimeError("corrupt JPEG")
        return [torch.zeros(3, 16, 16, dtype=torch.uint8) for _ in batch] if isinstance(data, list) else \
            torch.zeros(3, 16, 16, dtype=torch.uint8)
    decoder.decode = decode
    jpegs = [good] * 64
    jpegs[37] = bad
    out = decoder.decode_all(jpegs)
    assert [i for i, img in enumerate(out) if img is None] == [37]
    assert len(calls) <= 2 * 7 + 1  # about 2 log2(64) batched calls; before: 1 + 64 single ones


@pytest.mark.parametrize("decoder,device", DECODE_ON)
def test_a_very_large_downscale_goes_through_the_cpu_path_and_matches_it(tmp_path, decoder, device, monkeypatch):
    """#30 item 3: a 12 MP photo at img_size=64 shrinks ~45x, past what CUDA's antialiased bicubic
    resize takes (~47x fails); such crops are resized by the CPU path, so they match it exactly."""
    folder = jpeg_folder(tmp_path / "imgs", [(3000, 4000), (300, 400)])
    cpu, enc, dec = both_paths(folder, scale=(0.9, 1.0), decoder=decoder, device=device)
    resized = []
    real = dec.augment
    monkeypatch.setattr(dec, "augment", lambda imgs, g: resized.extend(g.tolist()) or real(imgs, g))
    keys = [0, 1, 2, 3]
    gpu_imgs, _, bad = decode_keys(enc, dec, keys)
    assert bad == 0
    assert all(max(g[2], g[3]) <= 32 * SIZE for g in resized) and len(resized) == 2  # only the small image
    for i, k in enumerate(keys):
        if k % 2 == 0:  # the large one: the CPU path's own pixels
            assert torch.equal(gpu_imgs[i], cpu[k][0])
        else:
            assert (gpu_imgs[i] - cpu[k][0]).abs().mean() < 0.02


# ---------------------------------------------------------------- #30 item 2: off the critical path

class CountOps(TorchDispatchMode):
    """The ops a piece of code dispatches from the host, less views (no kernel) and the decoder's own
    per-image calls (torchvision's ``image::`` ops, one batched call on CUDA)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and not str(func).startswith("image."):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_the_host_work_per_batch_does_not_grow_with_the_batch(tmp_path):
    """Crop, resize, flip and normalise are batched: the ops dispatched to decode and augment a batch of
    64 are as many as for a batch of 8 (before: about 5 small ops per image from Python)."""
    sizes = [(375, 500), (500, 375), (96, 96), (120, 300), (333, 222), (64, 200), (240, 320), (200, 150)]
    folder = jpeg_folder(tmp_path / "imgs", sizes)
    _, enc, dec = both_paths(folder, decoder="torchvision", resize="batched")  # what CUDA runs
    counts = {}
    for batch in (8, 64):
        images, _, _, keys, _ = collate_encoded([enc[k] for k in range(batch)])
        with CountOps() as ops:
            imgs, bad = dec(images, keys)
        assert bad == 0 and imgs.shape == (batch, 3, SIZE, SIZE)
        counts[batch] = len(ops.ops)
    assert counts[64] == counts[8] < 120, counts


def test_the_batched_resize_matches_torch_per_image_resize():
    """The crop folded into the resize weights, the flip into their column order: each image equals
    ``F.interpolate(crop, bicubic, antialias=True)`` (flipped where drawn), rounded to 8-bit levels as
    the per-image path did, for shrinks, stretches and a 30x shrink, in one padded batch."""
    import torch.nn.functional as F
    gen = torch.Generator().manual_seed(0)
    shapes_and_crops = [((375, 500), (10, 20, 300, 200, 0)), ((96, 96), (0, 0, 96, 96, 1)),
                        ((500, 375), (100, 3, 40, 50, 1)), ((64, 200), (5, 7, 30, 190, 0)),
                        ((2000, 1990), (0, 0, 1920, 1985, 1))]
    imgs = [torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8) for (h, w), _ in shapes_and_crops]
    geometry = torch.tensor([g for _, g in shapes_and_crops])
    dec = DeviceDecoder.__new__(DeviceDecoder)
    dec.size, dec.hw, dec.device, dec.batched = SIZE, (SIZE, SIZE), torch.device("cpu"), True
    dec.mean, dec.std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    out = dec.augment(imgs, geometry)
    for img, (top, left, h, w, flip), got in zip(imgs, geometry.tolist(), out):
        ref = F.interpolate(img[None, :, top:top + h, left:left + w].float(), size=(SIZE, SIZE), mode="bicubic",
                            antialias=True, align_corners=False)[0].round().clamp(0, 255)
        ref = ref.flip(-1) if flip else ref
        assert (got - ref).abs().max() <= 1  # a level where float rounding lands on .5
        assert (got != ref).float().mean() < 0.01


def encoded_batches(tmp_path, count: int, batch: int = 4):
    folder = jpeg_folder(tmp_path / "imgs", [(120, 160)] * (count * batch))
    _, enc, dec = both_paths(folder, decoder="torchvision")
    return [collate_encoded([enc[k] for k in range(i * batch, (i + 1) * batch)]) for i in range(count)], dec


def test_batches_are_decoded_ahead_in_a_background_thread(tmp_path):
    """While the loop holds batch 0 (its step running), the decode thread decodes batches 1 and 2; before,
    the next batch was decoded in the loop's own thread, between its steps. Same batches either way."""
    import threading
    from fcmae.data.decode_ahead import DeviceBatches
    batches, dec = encoded_batches(tmp_path, 5)
    decoded_in, second_ahead = [], threading.Event()
    real = dec.__call__

    class Recording:
        device = dec.device

        def __call__(self, enc, keys):
            out = real(enc, keys)
            decoded_in.append(threading.current_thread().name)
            if len(decoded_in) == 3:
                second_ahead.set()
            return out
    it = iter(DeviceBatches(batches, Recording(), ahead=2))
    first = next(it)
    assert second_ahead.wait(timeout=30), "batches 1 and 2 were not decoded while the loop held batch 0"
    rest = list(it)
    assert set(decoded_in) == {"fcmae-device-decode"}
    for got, batch in zip([first, *rest], batches):
        want, _ = dec(batch[0], batch[3])
        assert torch.equal(got[0], want) and torch.equal(got[3], batch[3])
    assert len(rest) == 4


def test_an_error_in_the_decode_thread_is_raised_in_the_loop_and_a_closed_loader_stops_the_thread(tmp_path):
    import threading
    from fcmae.data.decode_ahead import DeviceBatches
    batches, dec = encoded_batches(tmp_path, 3)

    def failing():
        yield batches[0]
        raise DataError("20 consecutive images could not be read, e.g. ['x.jpg']")
    it = iter(DeviceBatches(failing(), dec))
    next(it)
    with pytest.raises(DataError, match="20 consecutive images"):
        next(it)
    it = iter(DeviceBatches(batches, dec, ahead=1))
    next(it)
    it.close()  # the loop broke out (stop step, signal): the thread ends with it
    assert not [t for t in threading.enumerate() if t.name == "fcmae-device-decode"]


def test_a_decode_thread_that_cannot_set_up_its_device_says_why(monkeypatch):
    """The thread's CUDA setup (set_device, its stream) fails in the thread: the loop gets that error
    with its cause, not "stopped without handing over a batch"; an unindexed device is not set."""
    from fcmae.data.decode_ahead import DeviceBatches
    calls = []

    def set_device(device):
        calls.append(device)
        raise ValueError(f"cannot set {device}")

    class NoStream:
        def __init__(self, device):
            raise RuntimeError(f"no CUDA stream on {device} here")
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "Stream", NoStream)

    class Decoder:
        device = torch.device("cuda", 1)
    with pytest.raises(ValueError, match="cannot set cuda:1"):
        next(iter(DeviceBatches([None], Decoder())))
    Decoder.device = torch.device("cuda")
    with pytest.raises(RuntimeError, match="no CUDA stream on cuda"):
        next(iter(DeviceBatches([None], Decoder())))
    assert calls == [torch.device("cuda", 1)]


def test_the_batched_resize_makes_a_rectangle_of_data_img_size():
    """``data.img_size=[H, W]``: the batched resize's rows go to H, its columns to W (#50)."""
    import torch.nn.functional as F
    gen = torch.Generator().manual_seed(1)
    imgs = [torch.randint(0, 256, (3, 120, 90), generator=gen, dtype=torch.uint8) for _ in range(2)]
    geometry = torch.tensor([(4, 6, 100, 80, 0), (0, 0, 120, 90, 1)])
    dec = DeviceDecoder.__new__(DeviceDecoder)
    dec.size, dec.hw, dec.device, dec.batched = 48, (48, 32), torch.device("cpu"), True
    dec.mean, dec.std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    out = dec.augment(imgs, geometry)
    assert out.shape == (2, 3, 48, 32)
    for img, (top, left, h, w, flip), got in zip(imgs, geometry.tolist(), out):
        ref = F.interpolate(img[None, :, top:top + h, left:left + w].float(), size=(48, 32), mode="bicubic",
                            antialias=True, align_corners=False)[0].round().clamp(0, 255)
        ref = ref.flip(-1) if flip else ref
        assert (got - ref).abs().max() <= 1 and (got != ref).float().mean() < 0.01
