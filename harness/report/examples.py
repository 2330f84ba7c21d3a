"""reports/examples/: a report rendered from real public vLLM GPU logs, before anyone owns a GPU box.

The logs are the parser's fixtures taken from public issues (tests/fixtures/logs, whose
`<name>.expected.json` names its source). Each is ingested with a sidecar that links the issue
and names the GPU where the issue states it, then rendered like any run:

    python -m harness.report.examples [FIXTURES] [OUT]

The run id is fixed, so the device pages change only when the logs, the parser or the pages
do (the run page and manifest also state when the example was built).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "logs"
OUT = Path(__file__).resolve().parents[2] / "reports" / "examples"
RUN_ID = "20250101T000000Z-public-gpu-logs"
EPOCH = 1735689600  # 2025-01-01T00:00:00Z
# GPU logs from public issues: (fixture, the GPU the issue names or None when it names none)
LOGS = [
    ("arch_llava_qwen_pydantic_0_13", None),
    ("arch_minicpmv_v0_4_2_rank0", None),
    ("bf16_t4", "Tesla T4"),
    ("bf16_v100_glm", None),  # the log prints its GPU
    ("gated_hub_error_llama2", None),
    ("heads_not_divisible_52_8", None),
    ("heads_not_divisible_pydantic_64_3", None),
    ("nccl_watchdog_v0_5", None),
    ("olmocr_app_logger_prefix", None),
    ("oom_load_linear_0_11", None),
    ("pytorch_free_mem_below_util_cuda1", None),
    ("v0_10_2_tp2_worker_prefixes", None),
    ("v0_11_omni_no_cache_blocks", None),
    ("v0_20_1_kv_capacity", None),
    ("v0_2_7_maxlen_old", None),
    ("v0_6_3_t4_v0_header_ready", "Tesla T4"),
    ("v0_6_4_v0_maxlen_29k", "NVIDIA GeForce RTX 3090"),
    ("v0_7_rl_swarm_ready", None),
    ("v0_8_5_v0_unsloth_foreign_prefix", None),
    ("v0_8_5_v1_loading_compile", None),
    ("v0_8_5_yasinfu_engine_failed_wrapper", None),
    ("wizardlm_maxlen_v0_4", None),
]
_ISSUE = re.compile(r"([\w.-]+/[\w.-]+)#(\d+)")


def source_url(expected: Path) -> str:
    """The public issue a fixture's `source` names, as a URL."""
    found = _ISSUE.search(json.loads(expected.read_text(encoding="utf-8"))["source"])
    if not found:
        raise ValueError(f"{expected}: its source names no public issue")
    return f"https://github.com/{found.group(1)}/issues/{found.group(2)}"


def build(fixtures: Path = FIXTURES, out: Path = OUT) -> list[Path]:
    """Ingest the public GPU logs into a scratch run and render them into `out` (replaced)."""
    from harness import ingest
    from harness.report import published_root, render_reports
    from harness.store import publish, read_runs

    with tempfile.TemporaryDirectory() as scratch:
        logs, results = Path(scratch) / "logs", Path(scratch) / "results"
        logs.mkdir()
        for name, gpu in LOGS:
            shutil.copyfile(fixtures / f"{name}.log", logs / f"{name}.log")
            os.utime(logs / f"{name}.log", (EPOCH, EPOCH))  # a record's start is its log's mtime: keep it fixed
            side = {"source": source_url(fixtures / f"{name}.expected.json"), **({"gpu": gpu} if gpu else {})}
            (logs / f"{name}.json").write_text(json.dumps(side), encoding="utf-8")
        ingest.ingest_folder(logs, results, {}, run_id=RUN_ID, origin="public issues (tests/fixtures/logs)")
        if out.exists():
            shutil.rmtree(out)
        # rendered from the published copy alone: the scratch results (and their logs) go away,
        # so no page may link into them; each cell links its public source instead
        publish(read_runs([results]), published_root(out))
        empty = Path(scratch) / "empty"
        empty.mkdir()
        return render_reports(empty, out)


if __name__ == "__main__":
    args = [Path(a) for a in sys.argv[1:]]
    for path in build(*args):
        print(path)
