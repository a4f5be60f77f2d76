"""Benchmark pieces that need no engine: seed metrics, log names and format, perf stats, plots, ceilings."""

import json
import sys
from types import SimpleNamespace

import pytest

from zinfer.bench import ceilings
from zinfer.bench.metrics import (
    GB,
    BenchConfig,
    auto_output_file,
    cache_bytes,
    compute_metrics,
    hidden_bytes,
    model_bytes,
    output_path,
    write_benchmark_log,
)
from zinfer.bench.perf import Performance
from zinfer.bench.plot import format_table, plot_sweep, sweep_figure

# --- run_generation metrics ---------------------------------------------------------------------------


def test_metrics_use_last_loop_and_seed_formulas():
    # Loop 0 is warm-up and must be ignored: the seed reads costs[-1] and prefill_timings[-1].
    m = compute_metrics([0.5, 0.2], [3.0, 2.2], batch_size=4, prompt_len=512, gen_len=33, gpu_peak_mem=123)
    assert m["prefill_latency"] == 0.2
    assert m["prefill_throughput"] == pytest.approx(4 * 512 / 0.2)  # 10240 token/s
    assert m["decode_latency"] == pytest.approx(2.0)
    assert m["decode_throughput"] == pytest.approx(64.0)  # 4 * (33 - 1) / 2.0
    assert m["total_latency"] == 2.2
    assert m["total_throughput"] == pytest.approx(60.0)  # 4 * 33 / 2.2
    assert m["gpu_peak_mem"] == 123
    assert set(m) == {"prefill_latency", "prefill_throughput", "decode_latency", "decode_throughput",
                      "total_latency", "total_throughput", "gpu_peak_mem"}


def test_metrics_clamp_zero_decode_latency_like_the_seed():
    m = compute_metrics([1.0], [1.0], batch_size=1, prompt_len=8, gen_len=2, gpu_peak_mem=0)
    assert m["decode_throughput"] == pytest.approx(1 / 1e-10)


@pytest.mark.parametrize("prefill, total, match", [
    ([], [], "one prefill and one total latency per loop, got 0 prefill and 0 total"),
    ([0.1], [0.2, 0.3], "got 1 prefill and 2 total"),
    ([0.0], [1.0], "latencies must be positive, got prefill=0.0"),
])
def test_metrics_reject_bad_timings(prefill, total, match):
    with pytest.raises(ValueError, match=match):
        compute_metrics(prefill, total, 1, 1, 1, 0)


# --- config and file names ----------------------------------------------------------------------------


def test_bench_config_defaults_are_the_seeds():
    c = BenchConfig()
    assert (c.model, c.batch_size, c.prompt_len, c.gen_len) == ("facebook/opt-1.3b", 1, 512, 32)
    assert (c.output_file, c.verbose, c.quant_bits, c.quant_group_size, c.loops) == ("auto", 2, 16, 64, 3)
    assert (c.offload_dir, c.num_nodes, c.num_gpus_per_node) == ("~/offload_dir", 1, 1)
    assert not any([c.cpu_offload, c.disk_offload, c.dummy, c.kv_offload, c.pin_kv_cache, c.async_kv_offload])


@pytest.mark.parametrize("kwargs, name", [
    ({}, "ds-opt-1.3b-bs1-prompt512-gen32-n1x1-gpu.log"),
    # The seed's own example.
    (dict(model="facebook/opt-175b", batch_size=8, cpu_offload=True, kv_offload=True, quant_bits=4),
     "ds-opt-175b-bs8-prompt512-gen32-n1x1-cpu-kv_offload-w_quant.log"),
    (dict(model="bigscience/bloom", batch_size=16, prompt_len=128, gen_len=64, disk_offload=True,
          num_nodes=2, num_gpus_per_node=4, quant_bits=8),
     "ds-bloom-bs16-prompt128-gen64-n2x4-disk-w_quant.log"),
    (dict(model="/models/Llama-2-70b-hf/", kv_offload=True),
     "ds-Llama-2-70b-hf-bs1-prompt512-gen32-n1x1-gpu-kv_offload.log"),
    (dict(model="meta-llama/Llama-3.1-8B", quant_bits=16, output_file="auto"),
     "ds-Llama-3.1-8B-bs1-prompt512-gen32-n1x1-gpu.log"),
])
def test_auto_output_file_follows_seed_scheme(kwargs, name):
    config = BenchConfig(**kwargs)
    assert auto_output_file(config) == name
    assert output_path(config) == name


def test_explicit_output_file_is_kept():
    assert output_path(BenchConfig(output_file="run.log")) == "run.log"


@pytest.mark.parametrize("kwargs, match", [
    (dict(quant_bits=3), "quant_bits must be 4, 8 or 16, got 3"),
    (dict(verbose=5), "verbose must be 0, 1 or 2, got 5"),
    (dict(batch_size=0), "batch_size must be a positive int, got 0"),
    (dict(cpu_offload=True, disk_offload=True), "cpu_offload and disk_offload are exclusive"),
])
def test_bench_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BenchConfig(**kwargs)


# --- log ----------------------------------------------------------------------------------------------


def test_benchmark_log_appends_seed_format(tmp_path):
    metrics = compute_metrics([0.2], [2.2], batch_size=4, prompt_len=512, gen_len=33, gpu_peak_mem=3 * GB)
    path = tmp_path / "bench.log"
    record = write_benchmark_log(str(path), 2 * GB, GB // 2, GB // 4, **metrics)
    write_benchmark_log(str(path), 2 * GB, GB // 2, GB // 4, **metrics)
    expected = ("model size: 2.000 GB\tcache size: 0.500 GB\thidden size (p): 0.250 GB\n"
                "peak gpu mem: 3.000 GB\tprefill latency: 0.200 s\tprefill throughput: 10240.000 token/s\n"
                "decode latency: 2.000 s\tdecode throughput: 64.000 token/s\n"
                "total latency: 2.200 s\ttotal throughput: 60.000 token/s")
    assert record == expected
    assert path.read_text() == (expected + "\n") * 2


def test_benchmark_log_reports_binary_gigabytes(tmp_path):
    # literal bytes, so a change of unit fails: 1.5e9 B is 1.397 GiB (1.500 in decimal GB)
    metrics = compute_metrics([1.0], [2.0], batch_size=1, prompt_len=1, gen_len=1, gpu_peak_mem=40_000_000_000)
    record = write_benchmark_log(str(tmp_path / "b.log"), 1_500_000_000, 536_870_912, 3_000_000, **metrics)
    assert record.splitlines()[0] == "model size: 1.397 GB\tcache size: 0.500 GB\thidden size (p): 0.003 GB"
    assert record.splitlines()[1].startswith("peak gpu mem: 37.253 GB\t")
    assert GB == 1_073_741_824


# --- byte counts --------------------------------------------------------------------------------------


def test_byte_counts_match_seed_formulas():
    # Seed, L=2 h=4 V=10: per layer 4*13 + 4*5 + 4*17 + 16*5 + 16 = 236; (2*236 + 10*5) * 2 bytes.
    assert model_bytes(num_layers=2, hidden_size=4, vocab_size=10) == 1044
    assert model_bytes(2, 4, 10, ffn_size=16, num_heads=2, num_kv_heads=2, dtype_bytes=2) == 1044
    assert cache_bytes(num_layers=2, hidden_size=4, batch_size=3, seq_len=5) == 480  # 2*3*5*2*4*2
    assert hidden_bytes(hidden_size=4, batch_size=3, seq_len=5) == 120  # 3*5*4*2


def test_byte_counts_with_gqa_and_gated_mlp():
    # h=8, 4 heads, 2 kv heads -> kv width 4. Attention 8*(8+8+1) + 8*9 = 208;
    # MLP (ffn 16, gated) 8*17 + 16*9 + 8*17 = 416; norms 32; one byte each.
    nbytes = model_bytes(1, 8, 0, ffn_size=16, num_heads=4, num_kv_heads=2, dtype_bytes=1, gated_mlp=True)
    assert nbytes == 656
    assert cache_bytes(1, 8, 1, 1, num_heads=4, num_kv_heads=2) == 16  # 2 * 4 * 2 bytes
    with pytest.raises(ValueError, match="hidden_size=8, num_heads=3, num_kv_heads=1"):
        cache_bytes(1, 8, 1, 1, num_heads=3, num_kv_heads=1)


def seed_model_bytes(c):
    # DeepSpeedExamples inference/huggingface/zero_inference/utils.py, as written there
    h = c.hidden_size
    return 2 * (c.num_hidden_layers * (h * (3 * h + 1) + h * (h + 1) + h * (4 * h + 1) + h * 4 * (h + 1) + h * 4)
                + c.vocab_size * (h + 1))


def test_opt_log_sizes_equal_seed_formulas():
    transformers = pytest.importorskip("transformers")
    from zinfer.bench.run import log_sizes

    opt = transformers.OPTConfig(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32,
                                 vocab_size=50272)  # facebook/opt-1.3b
    config = BenchConfig(batch_size=8, prompt_len=512, gen_len=32)
    model, cache, hidden = log_sizes(opt, config, dtype_bytes=2)
    s = 512 + 32
    assert model == seed_model_bytes(opt) == 2_623_015_104
    assert cache == 2 * 8 * s * opt.num_hidden_layers * opt.hidden_size * 2
    assert hidden == 8 * s * opt.hidden_size * 2
    # Llama-3-8B (GQA 8/32, gated 14336 MLP): ours counts the real shape, so it is not the seed's number
    llama = transformers.LlamaConfig(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
    model, cache, _ = log_sizes(llama, config, dtype_bytes=2)
    assert model != seed_model_bytes(llama)
    assert cache * 4 == 2 * 8 * s * 32 * 4096 * 2  # K and V are 4x narrower than the seed's h


# --- DSPipeline Performance ---------------------------------------------------------------------------


@pytest.mark.parametrize("config", [
    SimpleNamespace(num_hidden_layers=2, hidden_size=1000),
    SimpleNamespace(n_layer=2, n_embd=1000),
])
def test_print_perf_stats_strips_warmup(config, capsys):
    # Warm-up (9 s each) dropped; avg of 10, 30, 20 ms = 20 ms. Params 12 * 2 * 1000^2 = 24e6.
    stats = Performance.print_perf_stats([9, 9, 9, 0.010, 0.030, 0.020], config, "float16", batch_size=4)
    assert stats["count"] == 3
    assert stats["avg_latency_ms"] == pytest.approx(20.0)
    assert stats["num_parameters"] == 24_000_000
    assert stats["bandwidth_gbps"] == pytest.approx(2.4)  # 24e6 * 2 B / 0.02 s
    assert stats["tflops"] == pytest.approx(0.0096)  # seed: 24e6 * 2 B * 4 / 0.02 s / 1e12
    assert stats["model_tflops"] == pytest.approx(0.0096)  # 2 * 24e6 * 4 / 0.02 s / 1e12
    out = capsys.readouterr().out.splitlines()
    assert out == ["Avg Per Token Latency:    20.00 ms", "Avg BW:     2.40 GB/s",
                   "Avg flops:     0.01 TFlops/s"]


@pytest.mark.parametrize("dtype, nbytes", [("bf16", 2), ("int8", 1), ("float32", 4), ("torch.bfloat16", 2)])
def test_print_perf_stats_dtype_bytes(dtype, nbytes):
    config = SimpleNamespace(num_hidden_layers=1, hidden_size=100)  # 120,000 params
    stats = Performance.print_perf_stats([0.5], config, dtype, batch_size=1, warmup=0)
    assert stats["bandwidth_gbps"] == pytest.approx(120_000 * nbytes / 0.5 / 1e9)


def test_print_perf_stats_accepts_hf_config_and_torch_dtype():
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    config = transformers.GPT2Config(n_layer=3, n_embd=64, n_head=4)
    stats = Performance.print_perf_stats([1.0, 1.0], config, torch.float16, batch_size=1, warmup=1)
    assert stats["num_parameters"] == 12 * 3 * 64 * 64


def test_print_perf_stats_errors():
    config = SimpleNamespace(num_hidden_layers=1, hidden_size=8)
    with pytest.raises(ValueError, match="got 3 latencies, all consumed by warmup=3"):
        Performance.print_perf_stats([1, 2, 3], config, "fp16", 1)
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        Performance.print_perf_stats([1], config, "fp8", 1, warmup=0)
    with pytest.raises(ValueError, match="has none of the attributes"):
        Performance.print_perf_stats([1], SimpleNamespace(hidden_size=8), "fp16", 1, warmup=0)


# --- plots and tables ---------------------------------------------------------------------------------


def test_plot_sweep_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"batch": b, "tok_s": 100.0 * b, "mode": m} for b in (1, 2, 4) for m in ("gpu", "cpu")]
    out = tmp_path / "sweep.png"
    assert plot_sweep(rows, "batch", "tok_s", str(out), ceiling=500.0, title="t", series="mode") == str(out)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 0


def _lines(fig) -> dict:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in fig.axes[0].get_lines()}


def test_sweep_figure_draws_the_ceiling():
    pytest.importorskip("matplotlib")
    rows = [{"batch": b, "tok_s": 100.0 * b, "mode": m, "max": 150.0 * b} for b in (1, 2) for m in ("gpu", "cpu")]
    # a number: one horizontal dashed line
    lines = _lines(sweep_figure(rows, "batch", "tok_s", ceiling=500.0, series="mode", ceiling_label="hbm bound"))
    assert set(lines) == {"mode=gpu", "mode=cpu", "ceiling: 500 (hbm bound)"}
    assert set(lines["ceiling: 500 (hbm bound)"][1]) == {500.0}
    # a row key: each series' own ceiling at each x, dashed in its colour
    fig = sweep_figure(rows, "batch", "tok_s", ceiling="max", series="mode")
    assert _lines(fig)["ceiling: mode=gpu"] == ([1, 2], [150.0, 300.0])
    styles = {line.get_label(): (line.get_linestyle(), line.get_color()) for line in fig.axes[0].get_lines()}
    assert styles["ceiling: mode=cpu"] == ("--", styles["mode=cpu"][1])
    assert {t.get_text() for t in fig.axes[0].get_legend().get_texts()} == set(_lines(fig))
    with pytest.raises(ValueError, match=r"keys 'batch', 'tok_s', 'nope'; rows \[0, 1, 2, 3\] lack them"):
        sweep_figure(rows, "batch", "tok_s", ceiling="nope")


def test_plot_sweep_without_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules makes the import fail
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_sweep([{"x": 1, "y": 2}], "x", "y", str(tmp_path / "p.png"))


def test_plot_sweep_rejects_rows_without_keys(tmp_path):
    with pytest.raises(ValueError, match=r"rows \[1\] lack them"):
        plot_sweep([{"x": 1, "y": 2}, {"x": 2}], "x", "y", str(tmp_path / "p.png"))


def test_format_table_aligns_columns():
    rows = [{"name": "a", "tok_s": 1234.5, "n": 1}, {"name": "bbb", "tok_s": 2.0}]
    assert format_table(rows, ["name", "tok_s", "n"]) == (
        "name     tok_s  n\n"
        "----  --------  -\n"
        "a     1,234.50  1\n"
        "bbb       2.00  -"
    )


# --- ceilings -----------------------------------------------------------------------------------------


def test_cpu_ceilings_are_positive_and_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("ZINFER_CACHE", str(tmp_path))
    first = ceilings.get_ceilings("cpu")
    assert first["device_copy_bytes_per_s"] > 0 and first["matmul_flops_per_s"] > 0
    assert first["device_type"] == "cpu"
    path = ceilings.cache_path("cpu")
    assert path.parent == tmp_path and path.name.startswith("ceilings-cpu")
    assert json.loads(path.read_text()) == first

    def must_not_measure():
        raise AssertionError("measured again instead of reading the cache")

    monkeypatch.setattr(ceilings, "_measure_cpu", must_not_measure)
    assert ceilings.get_ceilings("cpu") == first
    with pytest.raises(AssertionError, match="measured again"):
        ceilings.get_ceilings("cpu", refresh=True)


def test_disk_read_is_measured_and_cached_per_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("ZINFER_CACHE", str(tmp_path / "cache"))
    disk = ceilings.measure_disk_read(str(tmp_path), nbytes=4 << 20, chunk=1 << 20)
    assert disk["bytes_per_s"] > 0 and disk["bytes"] == 4 << 20
    assert disk["method"] == "O_DIRECT" or disk["method"].startswith("buffered")
    assert list(tmp_path.iterdir()) == []  # the probe file is removed

    calls = []
    monkeypatch.setattr(ceilings, "measure_disk_read", lambda d: calls.append(d) or {"bytes_per_s": 1.0})
    monkeypatch.setattr(ceilings, "_measure_cpu", lambda: {"device_copy_bytes_per_s": 1.0,
                                                           "host_read_bytes_per_s": 1.0})
    got = ceilings.get_ceilings("cpu", disk_dir=str(tmp_path))
    again = ceilings.get_ceilings("cpu", disk_dir=str(tmp_path))
    assert got["disk"][str(tmp_path.resolve())] == {"bytes_per_s": 1.0} and again == got
    assert calls == [str(tmp_path.resolve())]


def test_cpu_cache_without_the_host_read_rate_is_measured_again(monkeypatch, tmp_path):
    monkeypatch.setenv("ZINFER_CACHE", str(tmp_path))
    ceilings.cache_path("cpu").parent.mkdir(parents=True, exist_ok=True)
    # written before the read rate existed; its disk rates stay
    ceilings.cache_path("cpu").write_text('{"device_copy_bytes_per_s": 1.0, "disk": {"/x": {"bytes_per_s": 5.0}}}')
    monkeypatch.setattr(ceilings, "_measure_cpu", lambda: {"device_copy_bytes_per_s": 2.0,
                                                           "host_read_bytes_per_s": 3.0})
    got = ceilings.get_ceilings("cpu")
    assert got["host_read_bytes_per_s"] == 3.0 and got["device_copy_bytes_per_s"] == 2.0
    assert got["disk"] == {"/x": {"bytes_per_s": 5.0}}
    assert json.loads(ceilings.cache_path("cpu").read_text())["host_read_bytes_per_s"] == 3.0


def test_corrupt_cache_is_measured_again(monkeypatch, tmp_path):
    monkeypatch.setenv("ZINFER_CACHE", str(tmp_path))
    monkeypatch.setattr(ceilings, "_measure_cpu", lambda: {"device_copy_bytes_per_s": 1.0})
    ceilings.cache_path("cpu").write_text("{not json")
    with pytest.warns(UserWarning, match="ignoring corrupt ceilings cache"):
        assert ceilings.get_ceilings("cpu")["device_copy_bytes_per_s"] == 1.0


def test_roofline_helpers():
    assert ceilings.roofline_ratio(2.1e12, 3.0e12) == pytest.approx(0.7)
    assert ceilings.floor_ratio(measured_s=0.004, floor_s=0.003) == pytest.approx(0.75)
    assert ceilings.bytes_floor_s(16e9, 3.2e12) == pytest.approx(0.005)
    assert ceilings.prefill_floor_s(8e9, 512, 800e12) == pytest.approx(2 * 8e9 * 512 / 800e12)
    with pytest.raises(ValueError, match="a ceiling must be positive, got 0"):
        ceilings.roofline_ratio(1.0, 0)
    with pytest.raises(ValueError, match="measured on .cpu. or .cuda. devices, got meta"):
        ceilings.get_ceilings("meta")


@pytest.mark.gpu
def test_cuda_ceilings(monkeypatch, tmp_path):
    monkeypatch.setenv("ZINFER_CACHE", str(tmp_path))
    c = ceilings.get_ceilings(0)
    for key in ("device_copy_bytes_per_s", "h2d_pinned_bytes_per_s", "h2d_pageable_bytes_per_s",
                "matmul_flops_per_s"):
        assert c[key] > 0, key
