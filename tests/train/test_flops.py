"""The matmul peak MFU is reported against: measured once per machine and dtype, cached under $LOOM_CACHE."""

import json

from train import flops


def test_peak_is_measured_once_per_dtype_and_cached_under_loom_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOM_CACHE", str(tmp_path / "cache"))
    measured = []

    def fake_measure(dtype, shape=None, *, device=None):
        measured.append(dtype)
        return 1e9 * len(measured)

    monkeypatch.setattr(flops, "measure_matmul_flops", fake_measure)
    assert flops.matmul_peak_flops("float32") == 1e9
    assert flops.matmul_peak_flops("float32") == 1e9  # from the cache
    assert flops.matmul_peak_flops("bfloat16") == 2e9  # another dtype, another measurement
    assert measured == ["float32", "bfloat16"]
    cache = json.loads((tmp_path / "cache" / "peak_flops.json").read_text())
    assert sorted(cache.values()) == [1e9, 2e9] and all(k.startswith("cpu|") for k in cache)
    assert flops.matmul_peak_flops("float32", refresh=True) == 3e9  # refresh measures again
