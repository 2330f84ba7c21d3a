"""Failure class, evidence line and remedy from an engine log (one pass, with the facts).

Patterns are matched line by line; the most specific cause wins (wrappers such as "Engine
core initialization failed" only count when nothing above them explains the failure, and
then the last exception line before them is the evidence). Remedies are built at the end,
from the log's own numbers (budget, weights, estimate, compute capability, TP size).

Besides single lines, three things are followed across lines: the start-up stage an OOM
happened in (weight loading, profiling, CUDA graph capture, sampler warm-up: from the progress
lines and the traceback frames above the error; said so when the excerpt does not show it),
the shared-memory broadcast hang (the "no available block" line repeating with no ready line
after it), and whether the engine was ready before the failure (a request-time failure).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from harness.parse.facts import Facts, num, whole
from harness.parse.lines import LogLine

EVIDENCE_MAX = 600

# Cheap gate: a line can only be a failure line if it holds one of these.
_GATE: tuple[str, ...] = (
    "rror",
    "memory",
    "not supported",
    "imed out",
    "imeout",
    "gated",
    "divisible",
    "GPUs",
    "placement group",
    "chat template",
    "failed",
    "not found",
    "Not Found",
    "restricted",
    "valid model",
    "local folder",
    "died",
    "fatal",
    "Exception",
    "OutOfMemory",
    "capability",
    "does not recognize",
    "Invalid",
    "HF_TOKEN",
    "Repo id",
    "_check_scheme",
    "hit an exception",
    "OUT_OF_DEVICE",
    "RESOURCE_EXHAUSTED",
    "config format",
    "already dead",
    "Failed to start",
    "Dumping input",
)

# INFO/DEBUG lines carry few failures: negative KV, the Ray placement-group wait, the 0.32+
# DEBUG chat-template error, and errors an app logger re-logged at INFO.
_INFO_GATE: tuple[str, ...] = (
    "KV cache memory: -",
    "placement group",
    "chat template",
    "ChatTemplate",
    "rror",
    "imed out",
    "blocks: 0",
)
# A failed try that vLLM retries or works around (the Hub file list of a local path): not a cause.
_NOT_FATAL = ("Error retrieving ",)


@dataclass
class Hit:
    cls: str
    prio: int  # lower wins; equal -> the first seen
    evidence: str
    match: re.Match[str]
    fatal: bool = True
    stage: str | None = None  # for OOM: the start-up stage it happened in, if the log shows it
    order: int = 0  # prio * 2, + 1 for a traceback's `raise` source line (its message line wins a tie)


Spec = tuple[str, int, re.Pattern[str], bool]  # class, priority, pattern, fatal
_SPECS: list[Spec] = []


def _spec(cls: str, prio: int, pattern: str, fatal: bool = True) -> None:
    _SPECS.append((cls, prio, re.compile(pattern), fatal))


_N = r"(-?(?:\d[\d,]{0,24}(?:\.\d{1,12})?|\.\d{1,12}))"  # bounded: no quadratic backtracking on digit runs
# --- memory
_spec(
    "max_model_len_exceeds_kv",
    1,
    r"with the models?'s max seq len \("
    + _N
    + r"\), \("
    + _N
    + r" GB?(?:iB)? KV cache is needed, which is larger than the available KV cache memory \("
    + _N,
)
_spec(
    "max_model_len_exceeds_kv",
    1,
    r"The model's max seq len \("
    + _N
    + r"\) is larger than the maximum number of tokens that can be stored in KV cache \("
    + _N
    + r"\)",
)
_spec("kv_cache_insufficient", 1, r"No available memory for the cache blocks")
_spec(
    "kv_cache_insufficient",
    1,
    r"more than the " + _N + r" GiB of CPU memory reserved for it on node \d+, leaving none for the KV cache",
)
_spec("kv_cache_insufficient", 4, r"^Available KV cache memory: (-[\d.]+) ?GiB", fatal=False)
_spec("kv_cache_insufficient", 4, r"^# \w+ blocks: 0(?:,|$)", fatal=False)  # ≤0.7: 0 blocks, the error follows
_spec(
    "oom_other",
    1,
    r"Free memory on device(?: \S+)? \("
    + _N
    + "/"
    + _N
    + r" GiB\) on startup is less than desired GPU memory utilization \("
    + _N
    + ", "
    + _N,
)
_spec(
    "oom_other",
    1,
    r"Available memory on node \d+ \(" + _N + "/" + _N + r" GiB\) on (?:startup|kv cache allocation) is less than",
)
_spec("oom_weight_load", 1, r"Failed to load model - not enough GPU memory")
_spec("oom_other", 2, r"CUDA out of memory occurred when warming up (\w+)")
_spec(
    "oom_other",
    3,
    r"(?:CUDA|HIP|XPU|NPU) out of memory\. Tried to allocate "
    + _N
    + r" (\w)iB|(?:torch\.(?:cuda\.)?)?OutOfMemoryError\b|CUDA error: out of memory|out of memory",
)
# the same in vendor runtimes' words: Gaudi's device allocator, XPU's Level Zero, TPU's XLA (whose
# RESOURCE_EXHAUSTED status is a failed allocation or reservation, at compile or load time)
_spec(
    "oom_other",
    3,
    r"PT_DEVMEM Allocation failed|OUT_OF_DEVICE_MEMORY|RESOURCE_EXHAUSTED: |Ran out of memory in memory space"
    r"|hipErrorOutOfMemory|cudaErrorMemoryAllocation",
)
# --- model / hub
_spec(
    "unsupported_architecture",
    1,
    r"Model architectures? \[?([^\]]{1,300}?)\]? (?:are|is) not supported|Model architecture (\S+) was supported in vLLM until v(\S+)|Model architecture (\S+) is not supported in-tree anymore",
)
_spec("unsupported_architecture", 2, r"Model architectures \[?([^\]]{1,300}?)\]? failed to be inspected")
# the same, as the registry's own ERROR line above the subprocess traceback (0.6.x)
_spec("unsupported_architecture", 2, r"Error in inspecting model architecture '([^']{1,200})'")
_spec("unsupported_architecture", 1, r"model type `([^`]+)` but Transformers does not recognize this architecture")
_spec(
    "gated_or_auth",
    1,
    r"You are trying to access a gated repo|Cannot access gated repo for url \S*?huggingface\.co/([\w.-]+/[\w.-]+)|GatedRepoError|Access to model (\S+) is restricted|(40[13]) Client Error(?!.*Repository Not Found)|Invalid (?:user token|credentials in Authorization header|username or password)",
)
# (the lookbehind starts a name at its first character: linear time on a long run of name characters)
_spec(
    "model_not_found",
    2,
    r"Repository Not Found for url: \S*?huggingface\.co/(?:api/models/)?([\w.-]+/[\w.-]+)|RepositoryNotFoundError|(?<![\w./:-])([\w./:-]{1,200}) is not a local folder and is not a valid model identifier|404 Client Error|Incorrect path_or_model_id: '([^']+)'|does not appear to have a file named config\.json|LocalEntryNotFoundError|We couldn't connect to 'https://huggingface\.co'",
)
_spec("model_not_found", 3, r"Invalid repository ID or local directory specified: '([^']+)'")
_spec(
    "model_not_found",
    3,
    r"No supported config format found in (\S{1,300})|Can't load the configuration of '([^']{1,300})'",
)
# huggingface_hub's validator: the name is neither an existing directory nor a repo id
_spec("model_not_found", 2, r"Repo id must be .{0,40}?'namespace/repo_name': '([^']{1,300})'")  # (also retyped)
_spec("model_not_found", 3, r"\bHFValidationError\b")  # the validator's class, whatever its message says
_spec(
    "chat_template_missing",
    1,
    r"default chat template is no longer allowed|ChatTemplateResolutionError|tokenizer\.chat_template is not set",
    fatal=False,
)
# other request-time template failures: the template does not parse, or rejects the messages
_spec(
    "chat_template_missing",
    2,
    r"Error in applying chat template from request: (.{1,200})|while applying chat template|jinja2\.exceptions\.(Template\w{0,20}Error): (.{1,200})",
    fatal=False,
)
# --- hardware
# vLLM's ValueError, and compressed-tensors' RuntimeError whose message is a tuple of strings
_spec(
    "quantization_unsupported",
    1,
    r"(?:The quantization method (\S+)|Quantization scheme) is not supported for (?:', ')?the current GPU\. Min(?:imum)? capability: (\d+)\. (?:', ')?Current capability: (\d+)",
)
# a cut excerpt that shows only the frames of the scheme check
_spec("quantization_unsupported", 4, r"\b_check_scheme_supported\b")
_spec("quantization_unsupported", 2, r"Unknown quantization method: (\S+)|Unsupported quantization method")
_spec(
    "dtype_unsupported",
    1,
    r"Bfloat16 is only supported on GPUs with compute capability of at least 8\.0\. Your (.+?) GPU (?:has compute capability (\d+\.\d+)|does not have a compute capability)",
)
# --- parallelism
_spec(
    "tp_exceeds_gpus",
    1,
    r"(?:Tensor parallel size|World size) \((\d+)\) (?:cannot be larger|is larger) than the number of available GPUs \((\d+)\)",
)
_spec(
    "tp_exceeds_gpus",
    1,
    r"Total number of attention heads \((\d+)\) must be divisible by tensor parallel size \((\d+)\)",
)
_spec(
    "tp_exceeds_gpus",
    1,
    r"Total number of hidden layers \((\d+)\) must be divisible by pipeline parallel size \((\d+)\)",
)
_spec(
    "tp_exceeds_gpus",
    1,
    r"local_world_size \((\d+)\) must be less than or equal to the number of visible devices \((\d+)\)",
)
_spec(
    "tp_exceeds_gpus",
    2,
    r"The number of required (\w+?)s exceeds the total number of available \w+?s in the (?:placement group|cluster)|Cannot provide a placement group of|Unable to load Ray",
)
_spec("tp_exceeds_gpus", 2, r"Ray does not allocate any GPUs on the driver node")
# a worker asked for a GPU index past the visible ones (more ranks than CUDA_VISIBLE_DEVICES)
_spec("tp_exceeds_gpus", 3, r"CUDA error: invalid device ordinal")
# --- hangs
_spec(
    "timeout",
    1,
    r"Watchdog caught collective operation timeout|Timed out waiting for engine core processes to start"
    # the data-parallel start-up handshake (vLLM's own message lacks the space before "initial")
    r"|Timed out waiting for engines to send ?initial message"
    r"|RPC call to \S+ timed out|didn't reply within \d+ ?ms|GetTimeoutError|failed to start within " + _N + " seconds",
)
# --- wrappers: only the evidence of last resort
# Lines that only say that something below failed (every version's engine, worker and executor
# wording): the evidence of last resort. One list, also used to skip them as exception lines
# and to tell a log that holds nothing else.
_WRAPPERS = (
    r"Engine ?[Cc]ore (?:initialization failed|failed to start)|EngineCore initialization failed"
    r"|Engine process failed to start|(?:EngineCore|WorkerProc) hit an exception|WorkerProc failed to start"
    r"|EngineCore encountered (?:a fatal error|an issue)|died unexpectedly|Engine loop has died"
    r"|Error executing method '?\w{1,60}'?\. This might cause deadlock"
    r"|Exception in worker \S{1,80} while processing method|Exception in Replica\("
    r"|Worker failed with error|is already dead, terminating server process"
    r"|Task finished unexpectedly\. This should never happen"  # V0's AsyncEngineDeadError
    r"|Exception in ASGI application"  # uvicorn: a request raised (the server was serving)
    r"|Dumping input data for V1 LLM engine"  # V1: a scheduled step raised (its error follows)
    r"|\[vllm\] Error generating stream"  # Triton's vLLM backend: a request's generation raised
)
_spec("other", 8, _WRAPPERS)
_spec("other", 8, r"the replica will be stopped")  # Ray Serve
_spec("other", 8, r"Failed to start (?:the )?model server\b")  # KServe: the cause follows on the line
_spec("other", 7, r"Unable to register worker with raylet|Failed to register worker \w{1,64} to Raylet")

_REPO = re.compile(
    r"huggingface\.co/(?!api/|docs/|settings/|models\b)(?:api/models/)?([\w.-]+/[\w.-]+?)(?:/resolve/|/tree/|\.?(?:\s|$|\)))"
    r"|(?:Access to model|Repo model) ([\w.-]+/[\w.-]+)"
)
# `ray.exceptions.RayTaskError(RuntimeError): …` names the wrapped class in parentheses; V0's
# engine logs the exception's repr, `RuntimeError('CUDA error: …')`
_EXC_LINE = re.compile(
    r"^\s*(?:\[rank\d+\]:\s*)?([\w.]*(?:Error|Exception|Exit)(?:\([\w.]{1,60}\))?)(?:: (.+)|(\(['\"].+)|\s*$)"
)
_WRAPPER_EXC = re.compile(_WRAPPERS + r"|^\s*$")


# Start-up stages an OOM can happen in, by what the log prints in them (progress lines) and
# the frame names of their tracebacks. The outermost frame of a traceback names the stage.
_STAGE_FRAMES = (
    ("capture_model", "graph capture"),
    ("capture_end", "graph capture"),
    ("torch.cuda.graph(", "graph capture"),
    ("_dummy_sampler_run", "sampling"),
    # kernel warm-up and autotuning after the KV cache is allocated (DeepGEMM, FlashInfer)
    ("kernel_warmup", "kernel warm-up"),
    ("deep_gemm_warmup", "kernel warm-up"),
    ("profile_run", "profiling"),
    ("determine_num_available_blocks", "profiling"),
    ("determine_available_memory", "profiling"),
    ("load_model", "weight loading"),
    ("load_weights", "weight loading"),
    ("create_weights", "weight loading"),
    ("weight_loader", "weight loading"),
)
# a start-up step that finished: "Initial profiling/warmup run took 107.62 s", "Graph capturing
# finished in 5 secs", "Loading weights took …", "torch.compile takes … s in total"
_PROGRESS = re.compile(r"\b(?:took|takes) " + _N + r" ?(?:s\b|sec|GB|GiB)|\bfinished in " + _N)
# where a frame's file lives: vLLM, a fork or plugin (`/vllm/`, `/vllm_ascend/`, `/vllm-fork/`), or
# an HTTP client that talks to a server (`hosted_vllm` inside LiteLLM is a client, not vLLM)
_VLLM_PATH = re.compile(r"/vllm[\w-]{0,20}/")
_CLIENT_PATH = re.compile(r"/(?:openai|litellm|httpx|httpcore|requests|aiohttp)/")
# a traceback frame: Python's `File "…", line N, in f`, or IPython's `File ~/…/x.py:200, in f(…)`
# (also IPython's verbose form `/x/vllm/llm.py in __init__(self, …)`, in Colab a Markdown link
# `[/x/vllm/llm.py](https://…) in __init__(…)`)
_FRAME = re.compile(r'\s*(?:File (?:"|\S{1,300}:\d{1,6}, in )|\[?/\S{1,300}\.py(?:\]\(\S{1,300}\))? in \w)')
# frames only the request path runs (the OpenAI handlers' generators, V1's output handler, V0's
# engine loop): a traceback through them happened while the engine served
_SERVING_FRAME = re.compile(
    r"in (?:chat_completion_stream_generator|chat_completion_full_generator|completion_stream_generator"
    r"|create_chat_completion|create_completion|output_handler|run_engine_loop|engine_step|step_async"
    # an engine step (V1's busy loop, V0's LLMEngine.step) and an offline LLM.generate call
    r"|run_busy_loop|_process_engine_step|step|step_with_batch_queue|generate|_run_engine"
    r"|_validate_and_add_requests)\b"
    # V1's EngineCore.execute_model (0.8-0.10), which only its steps call; a worker's
    # execute_model is also the profile run's
    r'|/v1/engine/core\.py", line \d{1,6}, in execute_model\b'
)
_SHM_HANG = re.compile(r"^No available (?:shared memory broadcast )?block found in " + _N + " seconds?")


@dataclass
class Failures:
    best: Hit | None = None
    last_exception: str | None = None  # for "other": the root error printed before a wrapper
    saw_traceback: bool = False
    open_traceback: str | None = None  # an ERROR/level-less "Traceback" line no exception line closed yet
    stage: str | None = None  # the start-up stage the log last showed (for an OOM)
    frame_stage: bool = False  # `stage` came from the current traceback's frames
    shm_waits: int = 0  # "no available shared memory broadcast block" lines
    shm_line: str | None = None
    shm_seconds: float = 60.0
    shm_ready: bool = False  # the engine was ready when the last of them was printed
    shm_progress: bool = False  # a start-up step finished after the last of them (not hung)
    vllm_seen: bool = False  # a vLLM header line or a frame in vLLM's (or a fork's/plugin's) code
    vllm_frames: bool = False  # a traceback frame in vLLM's (or a fork's/plugin's) code
    client_frames: bool = False  # frames in an HTTP client (openai, LiteLLM, httpx, requests)
    last_error: str | None = None  # the last ERROR/CRITICAL line: the evidence of last resort

    def _track_stage(self, msg: str, fatal_level: bool, facts: Facts) -> None:
        """From a WARNING, ERROR or level-less line: a traceback starts, or a frame names a stage.
        (A traceback vLLM logs at WARNING is one it caught: it never ends the run.)"""
        if "Traceback" in msg:
            self.frame_stage = False
            if self.open_traceback is None and fatal_level:
                self.open_traceback = msg
            return
        if _FRAME.match(msg):
            if self.open_traceback is None and fatal_level:
                self.open_traceback = msg  # frames whose "Traceback" line the excerpt cut off
            if _VLLM_PATH.search(msg):
                self.vllm_seen = self.vllm_frames = True
                if _SERVING_FRAME.search(msg):
                    facts.ready = True  # the failure came up through the request path
            elif _CLIENT_PATH.search(msg):
                self.client_frames = True
        if "in " in msg or "(" in msg:
            for mark, stage in _STAGE_FRAMES:
                if mark in msg:
                    if not self.frame_stage:  # outermost frame wins within one traceback
                        self.stage, self.frame_stage = stage, True
                    return

    def _track_shm(self, msg: str, facts: Facts) -> bool:
        m = _SHM_HANG.match(msg)
        if m is None:
            return False
        if not self.shm_waits:
            self.shm_line = msg
        self.shm_waits += 1
        self.shm_seconds = num(m.group(1))
        self.shm_ready = facts.ready
        self.shm_progress = False
        return True

    def feed(self, line: LogLine, facts: Facts) -> None:
        msg = line.msg
        self.vllm_seen = self.vllm_seen or line.has_header
        if msg[:3] == "No " and self._track_shm(msg, facts):
            return
        if self.shm_waits and line.level == "INFO" and _PROGRESS.search(msg):
            self.shm_progress = True
        if line.level in ("INFO", "DEBUG"):
            gates = _INFO_GATE
            # "Capturing cudagraphs/the model/CUDA graphs" starts a stage; "Memory profiling
            # takes" (printed by every worker, in any order) ends one, so it is no marker
            if msg[:9] == "Capturing":
                self.stage, self.frame_stage = "graph capture", False
        else:
            gates = _GATE
            self._track_stage(msg, line.level != "WARNING", facts)
            if line.level in ("ERROR", "CRITICAL") and msg[:1] != " " and not msg.startswith(_NOT_ERROR):
                self.last_error = msg
            elif line.level is None and msg.startswith(_CLI_ERROR):
                self.last_error = msg  # a command-line tool's own fatal line (`error: creating server: …`)
        for gate in gates:
            if gate in msg:
                break
        else:
            if "Traceback" in msg:
                self.saw_traceback = True
            return
        if any(mark in msg for mark in _NOT_FATAL):
            return
        # a traceback's source line (`raise ValueError("No available memory …"`) names the error
        # being raised, but the message line under it states it with its numbers: that one wins
        source = msg.lstrip().startswith("raise ")
        if facts.repo is None and ("huggingface.co/" in msg or "model " in msg):
            rm = _REPO.search(msg)
            if rm:
                facts.repo = rm.group(1) or rm.group(2)
        for cls, prio, pattern, fatal in _SPECS:
            order = prio * 2 + source
            if self.best is not None and order >= self.best.order:
                continue
            m = pattern.search(msg)
            if m:
                stage = self._oom_stage(msg, facts) if cls == "oom_other" else None
                self.best = Hit(cls, prio, _evidence(msg), m, fatal, stage, order)
                break
        if source:
            return
        if line.level in (None, "ERROR", "CRITICAL"):
            em = _EXC_LINE.match(msg)
            if em:
                if self.open_traceback is not None:  # frames, then their exception: a traceback
                    self.saw_traceback = True  # even if the excerpt cut its "Traceback" line
                self.open_traceback = None  # the traceback ended in its exception line
            text = em and (em.group(2) or em.group(3))
            if text and not _WRAPPER_EXC.search(text):
                self.last_exception = msg
            elif em and not text and self.saw_traceback and em.group(1).endswith(("Error", "Exception")):
                self.last_exception = msg  # a bare `AssertionError` that ends a traceback

    def _oom_stage(self, msg: str, facts: Facts) -> str | None:
        if "warming up sampler" in msg:
            return "sampling"
        if "create" in msg and "weights" in msg:  # "Failed to create unquantized linear weights: …"
            return "weight loading"
        if self.stage is not None:
            return self.stage
        if facts.loading_started and not facts.loading_done:
            return "weight loading"
        return "after weight loading" if facts.loading_done else None

    def _hang(self, facts: Facts) -> Hit | None:
        """Two or more "no available block" waits and no ready line after them: a hang (one
        wait, or waits that end in a ready engine or in a finished start-up step, are a slow
        compile or load)."""
        if self.shm_waits < 2 or self.shm_line is None or (facts.ready and not self.shm_ready) or self.shm_progress:
            return None
        m = _SHM_HANG.match(self.shm_line)
        assert m is not None
        return Hit("timeout", 5, _evidence(f"{self.shm_line} (printed {self.shm_waits}×)"), m)

    def _fallback(self, facts: Facts) -> tuple[str, str, str] | None:
        """No known cause matched. Before the engine got ready, any error it printed ended the
        start: the last exception (with or without its traceback), else a traceback cut before
        its exception, else the last ERROR line. While serving, only a traceback through vLLM's
        own code (ended in its exception, or cut) is a (request-time) failure."""
        if self.client_frames and not self.vllm_frames:
            return None  # an HTTP client's own traceback (a proxy, a script): not the engine's
        if facts.ready:
            if not self.vllm_frames:
                return None
            if self.last_exception and self.saw_traceback:
                evidence = _evidence(self.last_exception)
            elif self.open_traceback:
                evidence = _evidence(self.open_traceback, _CUT_TRACEBACK) + _CUT_TRACEBACK
            else:
                return None
        elif self.last_exception:
            evidence = _evidence(self.last_exception)
        elif self.open_traceback:
            evidence = _evidence(self.open_traceback, _CUT_TRACEBACK) + _CUT_TRACEBACK
        elif self.last_error:
            evidence = _evidence(self.last_error)
        else:
            return None
        return _by_type(evidence), evidence, _remedy_other(evidence)

    def result(self, facts: Facts) -> tuple[str, str, str] | None:
        hit = self.best
        hang = self._hang(facts)
        if hang is not None and (hit is None or hit.prio > hang.prio):
            hit = hang
        if hit is None:
            return self._fallback(facts)
        if hit.cls == "other":
            evidence = _evidence(self.last_exception) if self.last_exception else hit.evidence
            return "other", evidence, _remedy_other(evidence)
        if not hit.fatal and facts.ready and hit.cls != "chat_template_missing":
            return None
        cls, evidence = hit.cls, hit.evidence
        if hit is hang:
            return cls, evidence, _remedy_hang(self.shm_waits, self.shm_seconds)
        stage = hit.stage
        if cls == "oom_other" and hit.prio == 3:  # a bare OOM: its stage decides
            if facts.ready and stage in (None, "after weight loading"):
                stage = "serving"  # a served engine's step ran out, not its start-up
            if stage == "weight loading":
                cls = "oom_weight_load"
            elif stage is None:
                evidence = _evidence(evidence, _NO_STAGE) + _NO_STAGE
        if cls == "oom_other":
            return cls, evidence, _remedy_oom_other(hit.match, facts, stage)
        return cls, evidence, _REMEDIES[cls](hit.match, facts)


# Exception types that name their class whatever their message says (the fallback's class)
_TYPE_CLASS = (
    ("OutOfMemoryError", "oom_other"),
    ("TimeoutError", "timeout"),
    ("TemplateError", "chat_template_missing"),
    ("TemplateSyntaxError", "chat_template_missing"),
    ("GatedRepoError", "gated_or_auth"),
    ("RepositoryNotFoundError", "model_not_found"),
    ("RevisionNotFoundError", "model_not_found"),
    ("EntryNotFoundError", "model_not_found"),
)
# ERROR lines that report, not fail: a retried download, a request's bad input
_NOT_ERROR = ("Error retrieving ", "Error in preprocessing prompt inputs")
_CLI_ERROR = ("error: ", "fatal: ", "FATAL: ")


def _by_type(evidence: str) -> str:
    em = _EXC_LINE.match(evidence)
    if em is not None:
        name = em.group(1).rsplit(".", 1)[-1]
        for suffix, cls in _TYPE_CLASS:
            if name.endswith(suffix):
                return cls
    return "other"


_CUT_TRACEBACK = " [the excerpt ends inside this traceback]"
_NO_STAGE = (
    " [stage not shown in this excerpt: weight loading, profiling, kernel warm-up, CUDA graph capture or sampling]"
)


def _evidence(msg: str, note: str = "") -> str:
    """The line, cut to leave room for a note appended after it."""
    msg = msg.strip()
    room = EVIDENCE_MAX - len(note)
    return msg if len(msg) <= room else msg[: room - 1] + "…"


# --------------------------------------------------------------------------- remedies
def _fmt(x: float) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".") if x != int(x) else f"{int(x)}"


def _util_needed(facts: Facts, extra_gib: float = 0.0) -> str | None:
    """The gpu_memory_utilization that would give the non-KV memory plus `extra_gib`."""
    total = facts.get("total_gpu_memory_gib")
    parts = [facts.get(k) for k in ("weights_gib", "activation_peak_gib", "non_torch_gib")]
    if not total or parts[0] is None:
        return None
    used = sum(p for p in parts if p and p > 0) + max(facts.get("cuda_graph_gib") or 0, 0) + extra_gib
    need = math.ceil(used / total * 100 + 1) / 100  # one point of headroom
    return f"{need:.2f}" if need < 1 else None


def _budget_text(facts: Facts) -> str:
    util, total, weights = (facts.get(k) for k in ("gpu_memory_utilization", "total_gpu_memory_gib", "weights_gib"))
    if util and total and weights is not None:
        return f" — weights take {_fmt(weights)} GiB of the {_fmt(util * total)} GiB budget ({_fmt(util)} × {_fmt(total)} GiB)"
    if weights is not None:
        return f" — weights take {_fmt(weights)} GiB"
    return ""


def _tp_next(facts: Facts) -> int:
    return (facts.get("tp_size") or 1) * 2


def _remedy_kv(m, facts: Facts) -> str:
    if facts.get("platform") == "cpu":
        return (
            "give the KV cache more memory: raise VLLM_CPU_KVCACHE_SPACE (GiB) or "
            "--kv-cache-memory-bytes, or gpu_memory_utilization, which sets the CPU memory share"
        )
    util = facts.get("gpu_memory_utilization")
    need = _util_needed(facts, extra_gib=1.0)
    target = (
        f"to at least {need} (room for the non-KV memory plus 1 GiB of KV cache)"
        if need
        else "above " + _fmt(util)
        if util
        else ""
    )
    head = f"raise gpu_memory_utilization {target}".rstrip()
    return (
        f"{head}{_budget_text(facts)}; or use tensor_parallel_size {_tp_next(facts)}, "
        "a quantized checkpoint, or a smaller model"
    )


def _remedy_maxlen(m, facts: Facts) -> str:
    est = facts.get("estimated_max_model_len")
    if m.re.pattern.startswith("The model's"):
        want, cap = whole(m.group(1)), whole(m.group(2))
        head = f"set max_model_len <= {cap:,} (the KV cache holds {cap:,} tokens; {want:,} requested)"
    else:
        want, need, avail = whole(m.group(1)), num(m.group(2)), num(m.group(3))
        limit = f"set max_model_len <= {est:,} (vLLM's estimate)" if est else f"lower max_model_len below {want:,}"
        head = limit
        if need > 0:  # GiB values print rounded; on tiny CPU caches both read 0.0
            head += f": one {want:,}-token request needs {_fmt(need)} GiB of KV cache, {_fmt(avail)} GiB is available"
    if facts.get("platform") == "cpu":
        return f"{head}; or give the KV cache more memory (VLLM_CPU_KVCACHE_SPACE or --kv-cache-memory-bytes)"
    util = facts.get("gpu_memory_utilization")
    more = f"raise gpu_memory_utilization above {_fmt(util)}" if util else "raise gpu_memory_utilization"
    return f"{head}; or {more}, or set kv_cache_dtype fp8"


def _remedy_oom_load(m, facts: Facts) -> str:
    total = facts.get("total_gpu_memory_gib")
    on = f" on this {_fmt(total)} GiB GPU" if total else ""
    return (
        f"the weights do not fit{on}: use tensor_parallel_size {_tp_next(facts)}, a quantized "
        "checkpoint (AWQ/GPTQ/FP8), or a GPU with more memory"
    )


# a paste hard-wrapped at a space can lose it ("Tried to allocate" ending one line, "666.00 MiB"
# starting the next)
_ALLOC = re.compile(r"Tried to allocate ?" + _N + r" ([KMGT])iB")
_STAGE_REMEDY = {
    "graph capture": "out of memory during CUDA graph capture (weights and KV cache already allocated): set "
    "enforce_eager, or {lower} (the graphs need room outside the KV cache), or capture fewer "
    "sizes (lower max_num_seqs)",
    "profiling": "out of memory in the profiling forward pass (one batch of max_num_batched_tokens): lower "
    "max_num_batched_tokens or max_model_len, or {lower}",
    "sampling": "out of memory while warming up the sampler: lower max_num_seqs, or {lower}",
    "serving": "out of GPU memory while serving (a step of the running engine): {lower} to leave more "
    "room outside the KV cache, or lower max_num_seqs / max_num_batched_tokens",
    "kernel warm-up": "out of memory warming up kernels (DeepGEMM, FlashInfer) after the KV cache was "
    "allocated: {lower} (the warm-up runs in the memory left outside the KV cache)",
    "after weight loading": "out of GPU memory after the weights loaded (profiling, CUDA graphs or the "
    "sampler): {lower}, lower max_num_seqs / max_num_batched_tokens, or set enforce_eager",
}


def _remedy_oom_other(m, facts: Facts, stage: str | None) -> str:
    text = m.group(0)
    if text.startswith("Free memory on device") or text.startswith("Available memory on node"):
        free, total = num(m.group(1)), num(m.group(2))
        fit = math.floor(free / total * 100) / 100  # vLLM's check: util × total <= free
        util = facts.get("gpu_memory_utilization")
        asked = f" but gpu_memory_utilization {_fmt(util)} asks for {_fmt(util * total)} GiB" if util else ""
        what = "CPU memory" if text.startswith("Available") else "GPU"
        return (
            f"only {_fmt(free)} of {_fmt(total)} GiB is free at startup{asked}: set "
            f"gpu_memory_utilization <= {fit:.2f} or stop the other processes using the {what}"
        )
    if "warming up" in text:
        reqs = _WARMUP_REQS.search(m.string)
        seqs = (
            f"set max_num_seqs below {reqs.group(1)} (it warms up with that many dummy requests)"
            if reqs
            else "lower max_num_seqs"
        )
        return f"out of memory while warming up the {m.group(1)}: {seqs}, or lower gpu_memory_utilization"
    util = facts.get("gpu_memory_utilization")
    lower = f"lower gpu_memory_utilization below {_fmt(util)}" if util else "lower gpu_memory_utilization"
    if stage in _STAGE_REMEDY:
        return _STAGE_REMEDY[stage].format(lower=lower)
    alloc = _ALLOC.search(m.string)
    ask = f"a {_fmt(num(alloc.group(1)))} {alloc.group(2)}iB allocation failed" if alloc else "an allocation failed"
    total = facts.get("total_gpu_memory_gib")
    on = f" on this {_fmt(total)} GiB GPU" if total else ""
    return (
        f"out of GPU memory: {ask}{on}; the excerpt does not show the stage, so keep the lines "
        f"above the error (weights too big: tensor_parallel_size {_tp_next(facts)} or a quantized "
        f"checkpoint; after loading: {lower}, lower max_num_seqs, or set enforce_eager)"
    )


_WARMUP_REQS = re.compile(r"sampler with (\d{1,7})(?!\d)")


def _arch_name(m) -> str:
    return next((g for g in m.groups() if g), "?").strip()


def _remedy_arch(m, facts: Facts) -> str:
    arch = _arch_name(m)
    ver = facts.get("vllm_version")
    this = f" (this log is vLLM {ver})" if ver else ""
    listed = arch.strip("'\"") and f"'{arch.strip(chr(39))}'" in m.string[m.end() :]
    if "inspect" in m.group(0) or listed:
        return (
            f"architecture {arch} exists in this vLLM but failed to import{this}: read the "
            "error printed with it (usually a transformers/torch version mismatch)"
        )
    if "Transformers does not recognize" in m.group(0):
        return f"upgrade transformers: it does not know model type {arch}"
    if "until v" in m.group(0):
        return f"use vLLM {m.group(3)} or older: architecture {m.group(2)} was removed after it"
    return (
        f"upgrade vLLM: architecture {arch} is not in this version{this}; or try "
        "--model-impl transformers if the architecture is in transformers"
    )


def _repo(m, facts: Facts) -> str | None:
    for g in m.groups():
        if g and "/" in g:
            return g.rstrip(".")
    return facts.repo


def _remedy_gated(m, facts: Facts) -> str:
    repo = _repo(m, facts)
    page = f"https://huggingface.co/{repo}" if repo else "the model page"
    if m.group(0).startswith("Invalid"):  # the Hub rejected the credentials themselves
        return (
            f"the Hub rejected the token (invalid or expired): set HF_TOKEN to a valid token; if the "
            f"repo is gated, also accept the licence at {page}"
        )
    return f"accept the licence at {page} and set HF_TOKEN to a token of an account that has access"


def _remedy_not_found(m, facts: Facts) -> str:
    if m.group(0).startswith("Repo id must"):
        return _remedy_repo_id(m.group(1))
    name = next((g for g in m.groups() if g and not g.isdigit()), None) or facts.repo
    what = f"'{name}'" if name else "the model"
    return (
        f"check the model id {what}: no such Hub repository or local directory with a "
        "config.json (typo, wrong path, or a private repo: set HF_TOKEN); offline, "
        "download it first"
    )


def _remedy_repo_id(name: str) -> str:
    if name.startswith("~"):
        return (
            f"'{name}' starts with '~', which nothing expanded: give the absolute path of the "
            "model directory (or a Hub id namespace/name)"
        )
    return (
        f"'{name}' is not a directory here, so it was taken for a Hub repo id, which it cannot be: "
        "check the path (inside a container: is the volume mounted there?) or give a Hub id namespace/name"
    )


def _remedy_chat(m, facts: Facts) -> str:
    text = m.group(0)
    if "Conversation roles must alternate" in m.string:
        return (
            "a request failed: the model's chat template wants strictly alternating user/assistant "
            "messages (often no system message): merge consecutive messages, or pass --chat-template "
            "with a template that accepts them"
        )
    if text.startswith("jinja2"):
        return (
            f"a request failed: the chat template does not render ({m.group(2)}: {m.group(3).strip()}): "
            "fix the template given with --chat-template or in the tokenizer's config"
        )
    if "applying chat template" in text:
        return (
            "a request failed in the chat template (the messages do not fit it; the error under this "
            "line says how): adapt the request, or pass --chat-template with a template that accepts it"
        )
    return "the tokenizer has no chat template: pass --chat-template FILE, or use /v1/completions"


def _remedy_quant(m, facts: Facts) -> str:
    if not m.re.groups:  # only the frames of the scheme check: the numbers were cut off
        cc = f" (this one: {facts.compute_capability})" if facts.compute_capability else ""
        return (
            "the checkpoint's quantization scheme needs a newer GPU than this one" + cc + ": the "
            "excerpt is cut before the capability numbers; use a GPU with a higher compute "
            "capability or a checkpoint in another format (e.g. AWQ/GPTQ)"
        )
    if m.group(0).startswith(("Unknown", "Unsupported")):
        return f"upgrade vLLM: quantization {m.group(1) or ''} is not known to this version".replace("  ", " ")
    method = m.group(1) or "scheme"
    need, have = int(m.group(2)), int(m.group(3))
    return (
        f"quantization {method} needs compute capability {need // 10}.{need % 10}, this GPU has "
        f"{have // 10}.{have % 10}: use a newer GPU or {_formats_for(have)}"
    )


def _formats_for(capability: int) -> str:
    """Checkpoint formats whose vLLM kernels run at this compute capability (their
    get_min_capability: GPTQ 6.0, AWQ 7.5)."""
    if capability >= 75:
        return "a checkpoint in another format (e.g. AWQ or GPTQ)"
    if capability >= 60:
        return "a GPTQ checkpoint (vLLM runs GPTQ from compute capability 6.0, AWQ from 7.5)"
    return "an unquantized checkpoint in float16 (vLLM's GPTQ kernels need compute capability 6.0)"


def _remedy_dtype(m, facts: Facts) -> str:
    cc = m.group(2) or facts.compute_capability
    gpu = f"this GPU ({m.group(1)}, compute capability {cc})" if cc else f"this GPU ({m.group(1)})"
    return f"{gpu} has no bf16: set dtype float16"


def _remedy_tp(m, facts: Facts) -> str:
    text = m.group(0)
    if "attention heads" in text or "hidden layers" in text:
        heads, size = int(m.group(1)), int(m.group(2))
        ok = [d for d in (1, 2, 4, 8, 16) if heads % d == 0 and d != size]
        what = "tensor_parallel_size" if "heads" in text else "pipeline_parallel_size"
        return f"{what} must divide {heads}: use {what} {max(d for d in ok if d < size) if any(d < size for d in ok) else ok[0]}"
    if text.startswith("Ray does not allocate"):
        return (
            "no GPU of the Ray placement group is on the node that runs vLLM: start vLLM on a GPU "
            "node of the cluster, or give the placement group a GPU bundle there"
        )
    if m.lastindex and m.lastindex >= 2 and m.group(2):
        want, have = int(m.group(1)), int(m.group(2))
        return (
            f"{want} GPUs requested (tensor_parallel_size × pipeline_parallel_size), {have} "
            f"visible: set tensor_parallel_size {have} or expose more GPUs (CUDA_VISIBLE_DEVICES)"
        )
    return (
        "more GPUs requested than the Ray cluster has: lower tensor_parallel_size / "
        "pipeline_parallel_size to the GPUs available, or add nodes (check `ray status`)"
    )


def _remedy_timeout(m, facts: Facts) -> str:
    text = m.group(0)
    if "Watchdog" in text:
        limit = _NCCL_TIMEOUT.search(m.string)
        after = f" for {_fmt(int(limit.group(1)) / 1000)} s" if limit else ""
        return (
            f"a collective between GPUs hung{after} (NCCL watchdog): check the interconnect "
            "(try NCCL_P2P_DISABLE=1), shared memory size (--shm-size), and that no rank died"
        )
    if "engine core" in text:
        return "the engine core took too long to start (slow weight loading): raise VLLM_ENGINE_READY_TIMEOUT_S"
    if "initial message" in text:
        return (
            "the engine processes never reported at start-up (the data-parallel handshake): check that "
            "every engine process started (the lines above) and that the data-parallel address and RPC "
            "port are reachable from every node"
        )
    if "failed to start within" in text:
        return "start-up took longer than the wrapper waited (first download or load): raise its timeout"
    return "a worker stopped answering: check that every rank is alive (the lines above this one)"


_NCCL_TIMEOUT = re.compile(r"Timeout\(ms\)=(\d{1,12})")


def _remedy_hang(waits: int, seconds: float) -> str:
    return (
        f"the engine hung: no worker took work from the shared-memory broadcast queue for "
        f"{waits} × {_fmt(seconds)} s. Look above for a worker that died or is stuck (NCCL, OOM); "
        "with several GPUs try NCCL_P2P_DISABLE=1 or --disable-custom-all-reduce; a very long "
        "compilation or weight quantization prints this too, and then ends in a ready engine"
    )


def _remedy_other(evidence: str) -> str:
    if "raylet" in evidence.lower():
        return (
            "Ray could not start its worker processes (raylet registration failed): clear the Ray "
            "session (`ray stop`, remove /tmp/ray) and retry, or use --distributed-executor-backend mp"
        )
    if evidence.endswith(_CUT_TRACEBACK):
        return (
            "the log is cut inside a traceback, before its exception line: keep the full engine "
            "output, stderr included, and parse it again"
        )
    if _WRAPPER_ONLY.search(evidence):
        return (
            "the log holds only the wrapper, not the root cause (traceback cut or in another "
            "process's output): keep the full engine output, stderr included, and parse it again"
        )
    return f"no known cause matched; the root error is: {evidence[:200]}"


_WRAPPER_ONLY = re.compile(_WRAPPERS)


# (oom_other's remedy also takes the stage: `result` calls it directly)
_REMEDIES: dict[str, Callable[[re.Match[str], Facts], str]] = {
    "kv_cache_insufficient": _remedy_kv,
    "max_model_len_exceeds_kv": _remedy_maxlen,
    "oom_weight_load": _remedy_oom_load,
    "unsupported_architecture": _remedy_arch,
    "gated_or_auth": _remedy_gated,
    "model_not_found": _remedy_not_found,
    "chat_template_missing": _remedy_chat,
    "quantization_unsupported": _remedy_quant,
    "dtype_unsupported": _remedy_dtype,
    "tp_exceeds_gpus": _remedy_tp,
    "timeout": _remedy_timeout,
}
