import io

import numpy as np
import pytest
import torch
from PIL import Image

from lecturekit import data


def test_shapes_contract():
    b = data.shapes(40, seed=3)
    assert b.images.shape == (40, 3, 64, 64) and b.images.dtype == torch.float32
    assert 0 <= b.images.min() and b.images.max() <= 1
    assert b.labels.shape == (40,) and b.labels.dtype == torch.long
    assert b.masks.shape == (40, 64, 64) and b.masks.dtype == torch.bool
    assert b.boxes.shape == (40, 4)
    assert b.classes == data.CLASSES and len(data.CLASSES) >= 8
    assert b.masks.flatten(1).any(1).all(), "every image has an object"


def test_shapes_deterministic_and_prefix_stable():
    a, b = data.shapes(300, seed=7), data.shapes(300, seed=7)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    small = data.shapes(5, seed=7)
    assert torch.equal(small.images, a.images[:5]) and torch.equal(small.masks, a.masks[:5])
    assert not torch.equal(data.shapes(5, seed=8).images, small.images)


def test_boxes_enclose_masks_tightly():
    b = data.shapes(64, seed=1)
    for mask, (x0, y0, x1, y1) in zip(b.masks, b.boxes.long().tolist()):
        ys, xs = np.nonzero(mask.numpy())
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_all_classes_appear_and_differ_in_form():
    b = data.shapes(800, seed=0)
    counts = b.labels.bincount(minlength=len(data.CLASSES))
    assert (counts > 50).all()
    # Form, not colour: the object's mean colour tells little about its class.
    obj_colour = torch.stack([(b.images[i] * b.masks[i]).sum((1, 2)) / b.masks[i].sum() for i in range(len(b))])
    per_class = torch.stack([obj_colour[b.labels == k].mean(0) for k in range(len(data.CLASSES))])
    assert per_class.std(0).max() < 0.08
    # ...while the mask's area relative to its box does (a ring or star fills less of its box).
    fill = b.masks.flatten(1).sum(1) / ((b.boxes[:, 2] - b.boxes[:, 0]) * (b.boxes[:, 3] - b.boxes[:, 1]))
    per_class_fill = torch.stack([fill[b.labels == k].mean() for k in range(len(data.CLASSES))])
    assert per_class_fill.max() - per_class_fill.min() > 0.25


def test_object_varies_in_size_position_and_is_on_clutter():
    b = data.shapes(200, seed=2)
    areas = b.masks.flatten(1).sum(1).float()
    assert areas.max() / areas.min() > 3
    centres = (b.boxes[:, :2] + b.boxes[:, 2:]) / 2
    assert centres.std(0).min() > 6
    def background_std(batch):  # mean over images of the background's own spread
        return torch.stack([batch.images[i].permute(1, 2, 0)[~batch.masks[i]].std(0).mean()
                            for i in range(len(batch))]).mean()

    clean = data.shapes(200, seed=2, clutter=0.0)
    assert torch.equal(clean.masks, b.masks), "clutter changes the background, not the objects"
    assert background_std(b) > 2 * background_std(clean), "the background is cluttered, not flat"


def test_shapes_other_size_and_classes():
    b = data.shapes(8, seed=0, size=32, n_classes=3)
    assert b.images.shape == (8, 3, 32, 32) and b.labels.max() < 3 and b.classes == data.CLASSES[:3]


@pytest.mark.parametrize("kwargs, match", [
    (dict(n=0), "positive number"), (dict(n=2.5), "positive number"),
    (dict(n=4, size=8), "size"), (dict(n=4, n_classes=1), "n_classes"), (dict(n=4, clutter=2), "clutter"),
])
def test_shapes_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.shapes(**kwargs)


@pytest.mark.parametrize("name", sorted(data.SAMPLE_IMAGES))
def test_sample_images(name):
    x = data.sample_image(name)
    assert x.dim() == 4 and x.shape[:2] == (1, 3) and min(x.shape[2:]) >= 256
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and x.std() > 0.02


def test_sample_image_size_and_unknown():
    assert data.sample_image("cat", size=224).shape == (1, 3, 224, 224)
    with pytest.raises(ValueError, match="did you mean"):
        data.sample_image("kat")


def _save(im: Image.Image, path, fmt="PNG"):
    im.save(path, fmt)
    return path


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "1", "LA"])
def test_load_image_any_mode_becomes_rgb(tmp_path, mode):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    im = rgb.convert(mode) if mode != "I;16" else Image.fromarray(rng.integers(0, 65535, (20, 30), dtype=np.uint16))
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
    x = data.load_image(_save(im, tmp_path / f"img.{fmt.lower()}", fmt))
    assert x.shape == (1, 3, 20, 30) and 0 <= x.min() and x.max() <= 1


def test_load_image_matches_pil_and_resizes(tmp_path):
    arr = np.random.default_rng(1).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    path = _save(Image.fromarray(arr), tmp_path / "a.png")
    x = data.load_image(path)
    assert torch.allclose(x[0].permute(1, 2, 0), torch.from_numpy(arr).float() / 255)
    assert data.load_image(path, size=32).shape == (1, 3, 32, 32)
    assert data.load_image(path, size=(10, 20)).shape == (1, 3, 10, 20)


def test_transparent_pixels_become_white_not_black(tmp_path):
    im = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    x = data.load_image(_save(im, tmp_path / "t.png"))
    assert torch.allclose(x, torch.ones_like(x))


def test_load_image_bad_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        data.load_image(tmp_path / "missing.png")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="could not read"):
        data.load_image(tmp_path / "notes.txt")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 99).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ValueError, match="truncated"):
        data.load_image(tmp_path / "cut.jpg")
    with pytest.raises(TypeError, match="path or URL"):
        data.load_image(42)


def test_load_image_refuses_huge_images(tmp_path, monkeypatch):
    path = _save(Image.new("RGB", (300, 300)), tmp_path / "big.png")
    monkeypatch.setattr(data, "MAX_PIXELS", 200 * 200)
    with pytest.raises(ValueError, match="pixels"):
        data.load_image(path)


def test_load_image_url_is_fetched_once_and_cached(tmp_path, monkeypatch):
    """A local HTTP server stands in for the web: one request, then the cache answers."""
    import http.server
    import threading

    png = io.BytesIO()
    Image.new("RGB", (8, 6), (0, 255, 0)).save(png, "PNG")
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            body = png.getvalue() if self.path == "/green.png" else b"x" * 5000
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "cache")
    try:
        url = f"http://127.0.0.1:{server.server_port}/green.png"
        x = data.load_image(url)
        assert x.shape == (1, 3, 6, 8) and x[0, 1].min() == 1 and x[0, 0].max() == 0
        data.load_image(url)
        assert hits == ["/green.png"]
        monkeypatch.setattr(data, "MAX_DOWNLOAD_BYTES", 1000)
        with pytest.raises(ValueError, match="bytes"):
            data.load_image(f"http://127.0.0.1:{server.server_port}/big.png")
        with pytest.raises(ValueError, match="could not fetch"):
            data.load_image("http://127.0.0.1:9/nothing.png", timeout=2)
    finally:
        server.shutdown()


@pytest.mark.parametrize("x, err, match", [
    (torch.rand(3, 8, 8), ValueError, r"\(N, 3, H, W\), got \(3, 8, 8\)"),
    (torch.rand(2, 1, 8, 8), ValueError, "got \\(2, 1, 8, 8\\)"),
    (torch.rand(0, 3, 8, 8), ValueError, "non-empty"),
    (torch.rand(1, 3, 8, 8) * 255, ValueError, r"\[0, 1\]"),
    (torch.full((1, 3, 8, 8), float("nan")), ValueError, "NaN"),
    (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), TypeError, "float"),
    (np.zeros((1, 3, 8, 8)), TypeError, "torch.Tensor"),
])
def test_check_images(x, err, match):
    with pytest.raises(err, match=match):
        data.check_images(x)


def test_check_targets():
    assert data.check_targets(3, 4, 8).tolist() == [3, 3, 3, 3]
    assert data.check_targets(torch.tensor([1, 2]), 2, 8).dtype == torch.long
    assert data.check_targets(torch.tensor(5), 3, 8).tolist() == [5, 5, 5]
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        data.check_targets(8, 2, 8)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        data.check_targets(-1, 2, 8)
    with pytest.raises(ValueError, match="shape \\(2,\\)"):
        data.check_targets(torch.tensor([1, 2, 3]), 2, 8)
    with pytest.raises(TypeError, match="dtype"):
        data.check_targets(torch.tensor([1.0, 2.0]), 2, 8)
    with pytest.raises(TypeError):
        data.check_targets("cat", 2, 8)
