"""The per-parameter seed offset of the LoRA init (fsdpqlora/model/adapters.py _stable_hash): the
same on every rank and in every process (Python's hash() is salted per process), so every rank
draws the same full A matrix and keeps its shard."""

from __future__ import annotations

from fsdpqlora.model.adapters import _stable_hash

NAMES = [f"model.layers.{i}.{m}.lora_A.default.weight" for i in range(4) for m in ("self_attn.q_proj", "mlp.up_proj")]


def test_it_is_the_base_131_polynomial_of_the_utf8_bytes_mod_2_31_minus_1():
    assert _stable_hash("") == 0
    assert _stable_hash("a") == 97
    assert _stable_hash("ab") == 97 * 131 + 98
    assert _stable_hash("é") == 0xC3 * 131 + 0xA9  # bytes, not code points
    for name in NAMES:
        expected = 0
        for byte in name.encode():
            expected = (expected * 131 + byte) % (2**31 - 1)
        assert _stable_hash(name) == expected


def test_known_values_do_not_change():
    # A change here changes every run's initial adapter (and what a given seed reproduces).
    assert _stable_hash("model.layers.0.self_attn.q_proj.lora_A.default.weight") == 1529480691
    assert _stable_hash("model.layers.1.self_attn.q_proj.lora_A.default.weight") == 833542120


def test_it_fits_a_generator_seed_and_tells_the_layers_apart():
    values = [_stable_hash(name) for name in NAMES]
    assert all(0 <= v < 2**31 - 1 for v in values)
    assert len(set(values)) == len(values)

