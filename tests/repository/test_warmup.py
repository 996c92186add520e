"""Warm-up samples run on every instance before a version is READY, and a bad sample fails the load clearly."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.lifecycle_models import add_simple, append_config, check_simple_output, index, infer_simple, wait_for

RANDOM_WARMUP = """model_warmup:
  - name: random
    batch_size: 4
    count: 2
    inputs:
      INPUT0: {data_type: TYPE_FP32, dims: [16], random_data: true}
      INPUT1: {data_type: TYPE_FP32, dims: [16], zero_data: true}
"""

FILE_WARMUP = """model_warmup:
  - name: from_file
    inputs:
      INPUT0: {data_type: TYPE_FP32, dims: [16], input_data_file: input0.bin}
      INPUT1: {data_type: TYPE_FP32, dims: [16], input_data_file: input0.bin}
"""

WRONG_NAME_WARMUP = """model_warmup:
  - name: wrong_name
    inputs:
      INPUT9: {data_type: TYPE_FP32, dims: [16], zero_data: true}
      INPUT1: {data_type: TYPE_FP32, dims: [16], zero_data: true}
"""

MISSING_FILE_WARMUP = """model_warmup:
  - name: no_file
    inputs:
      INPUT0: {data_type: TYPE_FP32, dims: [16], input_data_file: missing.bin}
      INPUT1: {data_type: TYPE_FP32, dims: [16], zero_data: true}
"""

SHORT_FILE_WARMUP = """model_warmup:
  - name: short_file
    inputs:
      INPUT0: {data_type: TYPE_FP32, dims: [16], input_data_file: short.bin}
      INPUT1: {data_type: TYPE_FP32, dims: [16], zero_data: true}
"""


def test_warmup_runs_before_ready_and_bad_samples_fail_the_load(start_server, tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    append_config(add_simple(repository, "warm_random"), RANDOM_WARMUP)
    from_file = add_simple(repository, "warm_file")
    append_config(from_file, FILE_WARMUP)
    (from_file / "warmup").mkdir()
    (from_file / "warmup" / "input0.bin").write_bytes(np.arange(16, dtype="<f4").tobytes())
    append_config(add_simple(repository, "warm_wrong_name"), WRONG_NAME_WARMUP)
    append_config(add_simple(repository, "warm_missing_file"), MISSING_FILE_WARMUP)
    short = add_simple(repository, "warm_short_file")
    append_config(short, SHORT_FILE_WARMUP)
    (short / "warmup").mkdir()
    (short / "warmup" / "short.bin").write_bytes(b"\0" * 12)
    server = start_server(repository, "--model-control-mode", "poll", "--repository-poll-secs", "0.3")

    rows = index(server.url)
    assert rows[("warm_random", "1")]["state"] == "READY"
    assert rows[("warm_file", "1")]["state"] == "READY"
    check_simple_output(infer_simple(None, server.url, "warm_random"))
    log = server.log()
    assert "warm-up 'random' ran 2 time(s) on 1 instance(s)" in log
    assert "warm-up 'from_file' ran 1 time(s) on 1 instance(s)" in log

    wrong = rows[("warm_wrong_name", "")]
    assert wrong["state"] == "UNAVAILABLE"
    assert "model_warmup 'wrong_name' failed" in wrong["reason"] and "INPUT9" in wrong["reason"]
    missing = rows[("warm_missing_file", "")]
    assert "model_warmup 'no_file' failed" in missing["reason"] and "missing.bin" in missing["reason"]
    short_row = rows[("warm_short_file", "")]
    assert "model_warmup 'short_file' failed" in short_row["reason"] and "needs 64 bytes" in short_row["reason"]

    # A reload whose warm-up fails keeps the warmed-up previous load serving.
    config = repository / "warm_random" / "config.yaml"
    config.write_text(config.read_text().replace("INPUT0:", "INPUT7:"))
    wait_for(lambda: "INPUT7" in index(server.url)[("warm_random", "1")]["reason"], what="the failed warm-up")
    assert index(server.url)[("warm_random", "1")]["state"] == "READY"
    check_simple_output(infer_simple(None, server.url, "warm_random"))
