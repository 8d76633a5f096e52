"""FP8 states (``--state-encoding fp8``): the encoding's error bound, and caches written with it read back, through
``open_cache`` and the training loader, as the cache's dtype within that bound; unknown encodings are refused.

The bound (pipeline/cache/encoding.py): per row, scale s = 2**e, the least power of two with max|x| <= 448 s; an
element in e4m3's normal range (|x| >= 2**-6 s) reads back within 2**-4 |x| (3 mantissa bits, round to nearest),
a smaller one within 2**-10 s (subnormal steps of 2**-9 s), zeros as zeros. Nothing is added by the cache's dtype:
an e4m3 value times a power of two has 4 significant bits, exact in bfloat16 and float32.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from pipeline.cache.encoding import decode_fp8, e4m3_values, encode_fp8, fp8_error_bound
from pipeline.cache.format import MANIFEST, CodecConfig, Manifest
from pipeline.cache.reader import open_cache
from pipeline.cache.writer import create_or_resume
from pipeline.errors import CacheError, ConfigError
from pipeline.train.data import LoaderConfig, make_loader
from tests.test_cache import LAYERS, VOCAB, H, manifest, record


def roundtrip(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    stored = encode_fp8(x)
    out = torch.empty(x.shape, dtype=dtype)
    decode_fp8(stored, (out.view(torch.uint16) if dtype == torch.bfloat16 else out).numpy())
    return out


def states(rows: int = 64, width: int = 256) -> torch.Tensor:
    """Gaussian rows with a few outlier channels and rows over many magnitudes (as LLM states have)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width, generator=gen)
    x[:, :3] *= 200.0  # outlier channels push most elements down the row's scale
    return x * torch.logspace(-6, 6, rows)[:, None]


def test_fp8_within_the_bound_in_float32_and_bfloat16():
    x = states()
    bound = fp8_error_bound(x)
    assert ((roundtrip(x) - x).abs() <= bound).all()
    xb = x.to(torch.bfloat16)  # a bf16 cache: the bound holds against the bf16 input, nothing added on output
    assert ((roundtrip(xb, torch.bfloat16).float() - xb.float()).abs() <= fp8_error_bound(xb)).all()
    # the normal range is the 2**-4 relative bound, and it is reached: the bound is tight
    big = x.abs() >= x.abs().amax(1, keepdim=True) / 224 * 2.0**-6
    rel = ((roundtrip(x) - x).abs() / x.abs())[big]
    assert rel.max() <= 2.0**-4 and rel.max() > 2.0**-4 * 0.9


def test_fp8_zeros_subnormals_signs_and_scale():
    row = torch.tensor([[448.0, -448.0, 0.0, -0.0, 2.0**-6, 2.0**-9, 2.0**-10, 3 * 2.0**-10, 1.5e-9]])
    out = roundtrip(row)
    # scale 1 here: 448 is e4m3's largest value; 2**-9 its smallest subnormal; 2**-10 a tie, to even (0)
    assert out.tolist() == [[448.0, -448.0, 0.0, -0.0, 2.0**-6, 2.0**-9, 0.0, 2.0**-9 * 2, 0.0]]
    assert torch.equal(roundtrip(torch.zeros(2, 8)), torch.zeros(2, 8))
    # the row's largest element lands in [224, 448] s, so it keeps full relative precision whatever its size
    for amax in (1e-20, 3.3, 449.0, 1e30):
        x = torch.tensor([[amax, amax / 3]])
        assert ((roundtrip(x) - x).abs() <= x.abs() * 2.0**-4).all()
        assert encode_fp8(x)[0, 0] in range(0x70, 0x7F)  # codes of 224..448: exponent field 15 (top binade)


def test_fp8_decodes_every_code_exactly():
    """The look-up table holds each e4m3 value, times the row's power of two, in both output dtypes."""
    codes = np.arange(256, dtype=np.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]  # the two NaN codes
    for e in (-100, -7, 0, 5, 119):
        stored = np.concatenate([codes, np.array([e], np.int8).view(np.uint8)])[None, :]
        want = e4m3_values()[codes].astype(np.float64) * 2.0**e
        f32 = np.empty((1, len(codes)), np.float32)
        decode_fp8(stored, f32)
        bf16 = np.empty((1, len(codes)), np.uint16)
        decode_fp8(stored, bf16)
        assert np.array_equal(f32[0], want)
        assert np.array_equal(torch.from_numpy(bf16).view(torch.bfloat16)[0].float().numpy(), want)


def write_fp8_cache(root, dtype: str = "bfloat16", states: str = "fp8"):
    gen = torch.Generator().manual_seed(0)
    embed = torch.randn(VOCAB, H, generator=gen).to(torch.bfloat16)
    m = dataclasses.replace(manifest(["shard-0.tar"]), codec=CodecConfig(states=states, chunk_tokens=4), dtype=dtype)
    writer = create_or_resume(root, m, lambda: {"embed_tokens": embed})
    part, records = writer.part("shard-0.tar"), []
    for i in range(5):
        records.append(record(f"s{i}", i, 5 + 3 * i, 1 + i % 3, gen))
        part.append(records[-1])
    part.finish()
    writer.finalise()
    return records


def test_fp8_cache_reads_back_within_the_bound(tmp_path):
    records = write_fp8_cache(tmp_path / "c")
    cache = open_cache(tmp_path / "c")
    assert cache.manifest.format_version == 3 and cache.info["states"] == "fp8"

    def within(got: torch.Tensor, want: torch.Tensor) -> bool:
        return got.dtype == torch.bfloat16 and ((got.float() - want.float()).abs() <= fp8_error_bound(want)).all()

    for got, r in zip((cache[i] for i in range(len(cache))), records, strict=True):
        want = r.states
        assert all(within(got["hidden_states"][layer], want.hidden_states[layer]) for layer in LAYERS)
        assert within(got["final_hidden"], want.final_hidden)
        audio = got["inputs_embeds"][torch.from_numpy(r.input_ids == 5)]
        assert torch.equal(audio, want.audio_embeds)  # audio embeddings stay exact
    # the training loader delivers the same decoded states as open_cache
    cfg = LoaderConfig(layers=LAYERS, max_tokens=64, num_workers=0, eval_percent=0.0, audio_embeds="merged")
    batch = next(iter(make_loader(tmp_path / "c", cfg, split="train", epoch=0)))
    key, b = batch["keys"][0], 0
    sample = next(cache[i] for i in range(len(cache)) if cache[i]["key"] == key)
    n = len(sample["input_ids"])
    assert torch.equal(batch["final_hidden"][b, :n], sample["final_hidden"])
    assert torch.equal(batch["aux"][b, :n, :H], sample["hidden_states"][LAYERS[0]])


def test_fp8_audio_encodes_the_audio_embeddings_too(tmp_path):
    records = write_fp8_cache(tmp_path / "c", states="fp8-audio")
    cache = open_cache(tmp_path / "c")
    for i, r in enumerate(records):
        audio = cache[i]["inputs_embeds"][torch.from_numpy(r.input_ids == 5)]
        want = r.states.audio_embeds
        assert not torch.equal(audio, want) and ((audio.float() - want.float()).abs() <= fp8_error_bound(want)).all()


def test_fp8_is_about_half_the_stored_state_bytes(tmp_path):
    write_fp8_cache(tmp_path / "c")
    part = next((tmp_path / "c" / "parts").iterdir())
    assert json.loads((part / "final_hidden" / "zarr.json").read_text())["shape"][1:] == [H + 1]  # codes + exponent
    assert json.loads((part / "final_hidden" / "zarr.json").read_text())["data_type"] == "uint8"


def test_unknown_state_encoding_is_refused(tmp_path):
    write_fp8_cache(tmp_path / "c")
    doc = json.loads((tmp_path / "c" / MANIFEST).read_text())
    doc["codec"]["states"] = "int4-lattice"
    (tmp_path / "c" / MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(CacheError, match=r"stores its hidden states as 'int4-lattice', an encoding this code cannot"):
        open_cache(tmp_path / "c")


def test_version_2_caches_read_as_exact_states(tmp_path):
    write_fp8_cache(tmp_path / "c")
    doc = json.loads((tmp_path / "c" / MANIFEST).read_text())
    doc["format_version"] = 2
    del doc["codec"]["states"]
    m = Manifest.from_dict(doc, tmp_path / "c" / MANIFEST)
    assert m.codec.states == "exact" and m.format_version == 3


def test_fp8_refused_for_float16_caches(tmp_path):
    with pytest.raises(ConfigError, match="fp8 needs a bfloat16 or float32 cache"):
        write_fp8_cache(tmp_path / "c", dtype="float16")


def test_dump_flags_choose_the_state_encoding():
    from stages import dump_hidden

    cfg = dump_hidden.parse_args(["s.tar", "out", "--state-encoding", "fp8", "--block-kib", "256"])
    assert cfg.codec == CodecConfig(states="fp8", block_kib=256)
    assert dump_hidden.parse_args(["s.tar", "out"]).codec.states == "exact"  # lossless by default
