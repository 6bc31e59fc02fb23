"""The matmul peak MFU is reported against: measured once per machine and dtype, cached under $LOOM_CACHE."""

import json

from train import flops


def test_peak_is_the_best_measurement_on_the_machine_cached_under_loom_cache(tmp_path, monkeypatch):
    # a measurement taken while something else holds the cores is low; the best one seen is kept
    monkeypatch.setenv("LOOM_CACHE", str(tmp_path / "cache"))
    measured = []
    values = iter([2e9, 1e9, 5e9, 3e9, 4e9])

    def fake_measure(dtype, shape=None, *, device=None):
        measured.append(dtype)
        return next(values)

    monkeypatch.setattr(flops, "measure_matmul_flops", fake_measure)
    assert flops.matmul_peak_flops("float32") == 2e9
    assert flops.matmul_peak_flops("float32") == 2e9  # a lower measurement does not replace it
    assert flops.matmul_peak_flops("float32") == 5e9  # a higher one does
    assert flops.matmul_peak_flops("bfloat16") == 3e9  # another dtype, its own entry
    assert measured == ["float32"] * 3 + ["bfloat16"]
    cache = json.loads((tmp_path / "cache" / "peak_flops.json").read_text())
    assert sorted(cache.values()) == [3e9, 5e9] and all(k.startswith("cpu|") for k in cache)
    (tmp_path / "cache" / "peak_flops.json").write_text("{not json")  # a damaged cache is measured anew
    assert flops.matmul_peak_flops("float32") == 4e9
