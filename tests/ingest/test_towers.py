"""ClipEmbedder: the open_clip towers behind starkret, checked against open_clip itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import starkret
from starkret import ClipEmbedder
from starkret.ingest.towers import DEFAULT_MODEL, MODEL_DEFAULT, _open_clip, _resolve_pretrained


def _pixels(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size), dtype=np.float32)


def test_tiny_model_encodes_images_and_texts_to_unit_vectors(tiny_embedder):
    emb = tiny_embedder
    assert (emb.dim, emb.image_size, emb.context_length) == (64, 336, 77)
    images = emb.encode_images(_pixels(3, 336))
    texts = emb.encode_texts(["a dog on a beach", "a bar chart", ""])
    for out in (images, texts):
        assert out.shape == (3, 64) and out.dtype == np.float16
        np.testing.assert_allclose(np.linalg.norm(out.astype(np.float32), axis=1), 1.0, atol=2e-3)


def test_float32_output_on_request(tiny_embedder):
    out = tiny_embedder.encode_texts(["a red bicycle"], dtype="float32")
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_same_seed_gives_identical_embeddings_and_other_seeds_differ(tiny_embedder):
    pixels = _pixels(2, 336, seed=1)
    again = ClipEmbedder("starkret-tiny", device="cpu", seed=0)
    other = ClipEmbedder("starkret-tiny", device="cpu", seed=1)
    a = tiny_embedder.encode_images(pixels, dtype="float32")
    np.testing.assert_array_equal(a, again.encode_images(pixels, dtype="float32"))
    assert not np.allclose(a, other.encode_images(pixels, dtype="float32"))


def test_building_a_model_leaves_the_global_random_state_alone():
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    ClipEmbedder("starkret-tiny", device="cpu")
    np.testing.assert_array_equal(torch.rand(3).numpy(), expected.numpy())


def test_embeddings_equal_open_clip_called_directly(tiny_embedder):
    pixels = _pixels(5, 336, seed=2)
    texts = ["a cat", "two people hiking in the mountains at dawn"]
    model = tiny_embedder.model
    tokenizer = _open_clip().get_tokenizer("starkret-tiny")
    with torch.no_grad():
        ref_img = model.encode_image(torch.from_numpy(pixels), normalize=True).numpy()
        ref_txt = model.encode_text(tokenizer(texts), normalize=True).numpy()
    np.testing.assert_allclose(
        tiny_embedder.encode_images(pixels, dtype="float32"), ref_img, atol=1e-5
    )
    np.testing.assert_allclose(
        tiny_embedder.encode_texts(texts, dtype="float32"), ref_txt, atol=1e-5
    )


def test_batching_does_not_change_results(tiny_embedder):
    pixels = _pixels(7, 336, seed=3)
    small = ClipEmbedder("starkret-tiny", device="cpu", batch_size=3)
    np.testing.assert_allclose(
        small.encode_images(pixels, dtype="float32"),
        tiny_embedder.encode_images(pixels, dtype="float32"),
        atol=1e-5,
    )


def test_empty_inputs_give_empty_outputs(tiny_embedder):
    assert tiny_embedder.encode_images(np.zeros((0, 3, 336, 336), np.float32)).shape == (0, 64)
    assert tiny_embedder.encode_texts([]).shape == (0, 64)


def test_long_texts_are_truncated_at_the_context_length(tiny_embedder):
    words = [f"word{i}" for i in range(200)]
    long = " ".join(words)
    truncated = " ".join(words[:60])  # both exceed 77 tokens: only the first 76 count
    a, b = tiny_embedder.encode_texts([long, truncated], dtype="float32")
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_image_size_is_configurable():
    emb = ClipEmbedder("starkret-tiny", device="cpu", image_size=224)
    assert emb.image_size == 224
    assert emb.encode_images(_pixels(1, 224)).shape == (1, 64)
    assert emb.preprocess_config["size"] == 224


def test_local_checkpoint_path_loads_those_weights(tmp_path, tiny_embedder):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_embedder.model.state_dict(), path)
    loaded = ClipEmbedder("starkret-tiny", pretrained=str(path), device="cpu", seed=99)
    assert loaded.pretrained == str(path)
    pixels = _pixels(2, 336, seed=4)
    np.testing.assert_array_equal(
        loaded.encode_images(pixels, dtype="float32"),
        tiny_embedder.encode_images(pixels, dtype="float32"),
    )


def test_model_default_weights():
    open_clip = _open_clip()
    assert _resolve_pretrained(open_clip, DEFAULT_MODEL, MODEL_DEFAULT) == "openai"
    assert _resolve_pretrained(open_clip, "starkret-tiny", MODEL_DEFAULT) is None
    assert _resolve_pretrained(open_clip, DEFAULT_MODEL, None) is None
    assert starkret.TINY_MODEL in open_clip.list_models()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"model": "no-such-model"}, ValueError, "unknown model"),
        ({"device": "tpu:7"}, ValueError, "device"),
        ({"device": "cuda"}, ValueError, "CUDA is not usable"),
        ({"precision": "int8"}, ValueError, "precision"),
        ({"precision": "fp16", "device": "cpu"}, ValueError, "not supported on CPU"),
        ({"pretrained": "/no/such/ckpt.pt"}, FileNotFoundError, "not found"),
        ({"image_size": 0}, ValueError, "image_size"),
        ({"batch_size": -1}, ValueError, "batch_size"),
    ],
)
def test_bad_arguments_raise_specific_errors(kwargs, error, message):
    if kwargs.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is usable here")
    kwargs = {"model": "starkret-tiny", **kwargs}
    with pytest.raises(error, match=message):
        ClipEmbedder(**kwargs)


def test_a_directory_as_checkpoint_is_refused_with_advice(tmp_path):
    with pytest.raises(ValueError, match="directory"):
        ClipEmbedder("starkret-tiny", pretrained=tmp_path)


@pytest.mark.parametrize(
    ("pixels", "message"),
    [
        (np.zeros((2, 336, 336, 3), np.float32), "shape"),
        (np.zeros((2, 3, 224, 224), np.float32), "shape"),
        (np.zeros((2, 3, 336, 336), np.int32), "float"),
    ],
)
def test_bad_pixel_arrays_are_refused(tiny_embedder, pixels, message):
    with pytest.raises(ValueError, match=message):
        tiny_embedder.encode_images(pixels)


def test_bad_text_inputs_are_refused(tiny_embedder):
    with pytest.raises(TypeError, match="single string"):
        tiny_embedder.encode_texts("a dog")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tiny_embedder.encode_texts(["a dog", 3])
    with pytest.raises(ValueError, match="dtype"):
        tiny_embedder.encode_texts(["a dog"], dtype="int8")
